"""Rank functions for tests/test_distributed.py (spawned processes must import them)."""

import os
import time

import torch
import torch.distributed as dist


def rank_info(rank):
    """Each rank sums its rank over the group and reports its pid."""
    t = torch.tensor([float(rank.rank)], device=rank.device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return {"rank": rank.rank, "world": rank.world_size, "sum": float(t), "pid": os.getpid(), "backend": rank.backend}


def fail_on_one(rank):
    """Rank 1 raises; rank 0 waits in a collective that rank 1 never reaches."""
    if rank.rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()
    return os.getpid()


def hang(rank, pid_file):
    """Every rank records its pid, then sleeps far past any test timeout."""
    with open(f"{pid_file}.{rank.rank}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def exit_zero(rank):
    """Every rank exits cleanly without returning anything."""
    import sys

    sys.exit(0)


def start_child_and_hang(rank, pid_file):
    """Each rank starts a long-running child process, records its pid, then sleeps."""
    import subprocess

    child = subprocess.Popen(["sleep", "600"])
    with open(f"{pid_file}.{rank.rank}", "w") as f:
        f.write(str(child.pid))
    time.sleep(600)


def abort_in_teardown(rank):
    """Return a result, then abort while the group is torn down (as gloo sometimes does)."""
    dist.destroy_process_group = lambda *args, **kwargs: os.abort()  # _entry calls it after saving
    return rank.rank


def abort_before_returning(rank):
    """Rank 0 aborts in the middle of its work: no result."""
    if rank.rank == 0:
        os.abort()
    return rank.rank


def start_session_child(rank, pid_file, hang_after):
    """Start a child in a session of its own (outside the rank's process group), record its pid;
    then return at once, or hang past the timeout."""
    import subprocess

    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    with open(f"{pid_file}.{rank.rank}", "w") as f:
        f.write(str(child.pid))
    if hang_after:
        time.sleep(600)
    return rank.rank


def interrupt_on_one(rank):
    """Rank 1 is interrupted (KeyboardInterrupt); rank 0 returns."""
    if rank.rank == 1:
        raise KeyboardInterrupt
    return rank.rank


def mismatched_all_reduce(rank):
    """The ranks reduce tensors of different sizes: gloo aborts the process."""
    t = torch.zeros(4 if rank.rank == 0 else 8)
    dist.all_reduce(t)
    return rank.rank
