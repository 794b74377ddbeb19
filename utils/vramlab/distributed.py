"""Start ranks of ``torch.distributed`` from a notebook, and always clean them up.

:func:`launch` spawns ``world_size`` processes, joins them into one process group (gloo on
CPUs, NCCL when there is one GPU per rank: the same code, the backend picked at run time),
calls ``fn(rank, *args)`` in each, and returns what every rank returned. If a rank raises,
the others are killed and :class:`RankFailed` says which rank failed and why; if the ranks
run past ``timeout_s``, all are killed and :class:`RanksTimedOut` is raised. No process
outlives the call, even when the notebook cell is interrupted.

The rank function must be importable (defined in a module, not in a notebook cell): the
processes are started with "spawn", which imports it afresh in each process.

:func:`torchrun` runs a module the way practitioners launch training, under PyTorch's
``torchrun`` (``python -m torch.distributed.run``), and collects the JSON line each rank prints.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from .device import has_cuda


class RankFailed(RuntimeError):
    """A rank raised; the message names the rank and carries its error."""


class RanksTimedOut(RuntimeError):
    """The ranks ran past the timeout and were killed."""


@dataclass(frozen=True)
class Rank:
    """What a rank function is given: its rank, the world size, its device and the backend."""

    rank: int
    world_size: int
    device: torch.device
    backend: str

    @classmethod
    def in_process(cls, device: str | torch.device = "cpu") -> Rank:
        """This process alone (rank 0 of 1, no process group): for single-process references
        of the rank functions that need no collective."""
        return cls(0, 1, torch.device(device), "none")


def pick_backend(world_size: int) -> str:
    """NCCL when there is a CUDA GPU for every rank, gloo (CPU tensors) otherwise."""
    if has_cuda() and dist.is_nccl_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def _entry(
    index: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    outdir: str,
    timeout_s: float,
    args: tuple,
) -> None:
    if hasattr(os, "setpgrp"):  # a group of its own, so the launcher can kill what the rank starts
        os.setpgrp()
    # torch stops the ranks with SIGINT when their launcher dies; a launcher started in the
    # background (nohup, `&` in a script) hands them SIGINT ignored, so restore Python's handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    launcher = os.getppid()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    device = torch.device("cuda", index) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=index, world_size=world_size, timeout=timeout)
    interrupted = False
    try:
        result = fn(Rank(index, world_size, device, backend), *args)
        dist.barrier()  # no rank tears the group down while a peer is still in a collective
        torch.save(result, Path(outdir) / f"rank{index}.pt")
    except BaseException as err:  # record when and why, so the parent can name the first failure
        interrupted = isinstance(err, KeyboardInterrupt)
        with contextlib.suppress(OSError):
            (Path(outdir) / f"rank{index}.err").write_text(f"{time.time()!r}\n{type(err).__name__}: {err}")
        raise
    finally:
        kill_descendants(os.getpid())  # also children started in a session of their own
        if interrupted and _gone(launcher):  # the launcher died (torch then sends its ranks SIGINT)
            shutil.rmtree(outdir, ignore_errors=True)  # nobody else will remove its folder
        dist.destroy_process_group()  # last: gloo may abort here when a peer is gone


def _gone(pid: int, wait_s: float = 2.0) -> bool:
    """Whether process ``pid`` (this one's parent) has died or is dying, waiting up to ``wait_s``:
    the death signal can arrive before the kernel has reparented this process."""
    deadline = time.monotonic() + wait_s
    while True:
        if os.getppid() != pid:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return True
        except (OSError, IndexError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def kill_descendants(pid: int) -> None:
    """SIGKILL every process descended from ``pid`` (read from /proc; Linux only), whatever its
    process group or session: a rank's ``Popen(..., start_new_session=True)`` child too."""
    for child in _descendants(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in children.read_text().split()]
                found += kids
                stack += kids
    return found


MAX_TIMEOUT_S = 7 * 24 * 3600.0


def launch(
    fn: Callable[..., Any], world_size: int = 2, args: tuple = (), timeout_s: float = 120.0, backend: str | None = None
) -> list[Any]:
    """Run ``fn(Rank, *args)`` on ``world_size`` new processes; return the ranks' results, in
    rank order. Results must be picklable (numbers, dicts, CPU tensors)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(
            f"timeout_s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f} "
            f"(a week), got {timeout_s!r}."
        )
    if not callable(fn):
        raise ValueError(f"fn must be the rank function, fn(rank, *args), got {type(fn).__name__} {fn!r:.60}.")
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU processes) or 'nccl' (one GPU per rank), got {backend!r}.")
    if backend == "nccl" and not (has_cuda() and torch.cuda.device_count() >= world_size):
        raise ValueError(f"backend 'nccl' needs one CUDA GPU per rank ({world_size}); use 'gloo' here.")
    if getattr(fn, "__module__", "__main__") == "__main__" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(
            f"{getattr(fn, '__name__', fn)!r} is defined in the notebook (or inside a function): spawned "
            "processes cannot import it. Put the rank function in a module (vramlab.parallel has the course's)."
        )
    backend = backend or pick_backend(world_size)
    # The rendezvous store lives in this process on a port the OS picks, so no race for a free port.
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    outdir = tempfile.mkdtemp(prefix="vramlab-ranks-")
    context = None
    try:
        context = torch.multiprocessing.start_processes(
            _entry,
            args=(fn, world_size, store.port, backend, outdir, timeout_s, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not _join(context, 0.5, outdir):
            if time.monotonic() > deadline:
                raise RanksTimedOut(
                    f"{world_size} ranks ran longer than {timeout_s:g} s and were killed. "
                    "A rank may be waiting in a collective another rank never reached."
                )
        return [_result(outdir, i) for i in range(world_size)]
    finally:
        if context is not None:
            _kill(context)
            for error_file in getattr(context, "error_files", []) or []:  # torch's, left in $TMPDIR otherwise
                with contextlib.suppress(OSError, TypeError):
                    os.unlink(error_file)
        del store
        shutil.rmtree(outdir, ignore_errors=True)


def torchrun(module: str, nproc: int = 2, args: Sequence[str] = (), timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Run ``torchrun --standalone --nproc-per-node nproc -m module *args`` (as
    ``python -m torch.distributed.run``, with this interpreter) and return the JSON object each
    rank printed on a line of its own, in rank order. The module must be importable by a fresh
    interpreter: this package's folder is put on ``PYTHONPATH``. A failure or a timeout raises
    :class:`RankFailed` or :class:`RanksTimedOut` with torchrun's last line of error output; no
    process outlives the call."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}.")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(
            f"timeout_s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f}, got {timeout_s!r}."
        )
    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    logs = tempfile.mkdtemp(prefix="vramlab-torchrun-")  # torchrun's log folder: else it leaves one in /tmp per run
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    try:
        process = subprocess.Popen(
            [*command, f"--log-dir={logs}", "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills torchrun and every rank
        )
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise RanksTimedOut(f"torchrun ran past {timeout_s:g} s and was killed with its ranks") from None
        except BaseException:  # Ctrl-C in the notebook: take the ranks down too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    if process.returncode:
        raise RankFailed(f"torchrun exited with code {process.returncode}: {_rank_error(err)}")
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    return sorted(rows, key=lambda row: row.get("rank", 0))


def _rank_error(stderr: str) -> str:
    """The first error a rank printed (an exception's last line, or argparse's "error:" line)."""
    for line in stderr.splitlines():
        if re.match(r"^[\w.]*(Error|Exception): ", line) or ": error: " in line or "No module named" in line:
            if "ChildFailedError" not in line:
                return line.strip()
    return "no rank printed an error (see torchrun's own output)"


def _result(outdir: str, rank: int) -> Any:
    path = Path(outdir) / f"rank{rank}.pt"
    failure = Path(outdir) / f"rank{rank}.err"
    why = failure.read_text().partition("\n")[2] if failure.exists() else ""
    if not path.exists() and why and not why.startswith("SystemExit"):  # e.g. KeyboardInterrupt: no traceback
        raise RankFailed(f"rank {rank} failed: {why}")
    if not path.exists():
        raise RankFailed(
            f"rank {rank} exited without returning a result (sys.exit() or os._exit() in the rank "
            "function?). Return a value from the rank function instead of exiting."
        )
    return torch.load(path, weights_only=False)


def _join(context: Any, timeout: float, outdir: str) -> bool:
    try:
        return bool(context.join(timeout=timeout))
    except torch.multiprocessing.ProcessRaisedException as err:
        rank, first = _first_failure(outdir, err.error_index, str(err).strip().splitlines()[-1])
        others = "" if rank == err.error_index else f" (rank {err.error_index} failed after it)"
        raise RankFailed(f"rank {rank} failed: {first}{others}\n\n{err}") from None
    except torch.multiprocessing.ProcessExitedException as err:
        if _all_results(outdir, len(context.processes)):
            return True  # a crash while tearing the group down, after every rank returned its result
        raise RankFailed(f"rank {err.error_index} {_exit_reason(err.exit_code)}") from None


def _exit_reason(code: int) -> str:
    """What a rank's exit code says, in words (a negative code is the signal that ended it)."""
    if code >= 0:
        return f"exited with code {code} without returning a result"
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
    why = {
        "SIGABRT": "a C++ error inside torch or gloo, e.g. tensors of different sizes in one collective",
        "SIGKILL": "killed: out of memory (the kernel's OOM killer), or by hand",
        "SIGSEGV": "a crash in native code",
    }.get(name, "ended by a signal")
    return f"was ended by {name} (exit code {code}: {why})"


def _all_results(outdir: str, world_size: int, wait_s: float = 2.0) -> bool:
    """Whether every rank saved its result (waiting briefly for peers still writing). Gloo can
    abort a process in ``destroy_process_group`` ("terminate called without an active
    exception") after the rank function returned: its results are complete and stand."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if all((Path(outdir) / f"rank{i}.pt").exists() for i in range(world_size)):
            return True
        time.sleep(0.1)
    return False


def _first_failure(outdir: str, rank: int, message: str) -> tuple[int, str]:
    """The rank whose error came first (a dead rank makes its peers fail in collectives)."""
    time.sleep(0.5)  # let the peers' error records land
    records = []
    for path in Path(outdir).glob("rank*.err"):
        stamp, _, text = path.read_text().partition("\n")
        records.append((float(stamp), int(path.stem[4:]), text))
    return (min(records)[1], min(records)[2]) if records else (rank, message)


def _kill(context: Any) -> None:
    """Kill every rank and every process it started (each rank leads its own process group)."""
    for process in context.processes:
        if process.pid is not None:
            kill_descendants(process.pid)  # children in sessions of their own are outside its group
        if process.pid is not None and hasattr(os, "killpg"):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the rank had not made its group yet (or is gone): kill it alone below
        if process.is_alive():
            process.kill()
        process.join(timeout=5)


# ----------------------------------------------------------------------- counting traffic
COLLECTIVES = {
    "allreduce_": "all-reduce",
    "allreduce_coalesced_": "all-reduce",
    "allgather_into_tensor_coalesced_": "all-gather",
    "_allgather_base_": "all-gather",
    "allgather_": "all-gather",
    "reduce_scatter_tensor_coalesced_": "reduce-scatter",
    "_reduce_scatter_base_": "reduce-scatter",
    "reduce_scatter_": "reduce-scatter",
    "broadcast_": "broadcast",
    "send": "send",
    "recv_": "recv",
}
FUNCTIONAL_COLLECTIVES = {  # torch.distributed._functional_collectives, which DTensor issues; input first
    "all_reduce": "all-reduce",
    "all_reduce_": "all-reduce",
    "all_reduce_coalesced": "all-reduce",
    "all_gather_into_tensor": "all-gather",
    "all_gather_into_tensor_coalesced": "all-gather",
    "reduce_scatter_tensor": "reduce-scatter",
    "reduce_scatter_tensor_coalesced": "reduce-scatter",
    "broadcast": "broadcast",
}


class CommCounter(TorchDispatchMode):
    """Count the payload of every c10d collective a rank issues (DDP, ZeRO and FSDP included,
    and the functional collectives DTensor issues), by kind. Payload = bytes of the tensors the
    rank hands to the collective: for all-reduce and broadcast the buffer, for all-gather the
    rank's input shard, for reduce-scatter the full input.
    ``bytes`` maps kind -> bytes; ``calls`` maps kind -> count."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        namespace, name = func.namespace, func._opname
        if (namespace == "c10d" and name in COLLECTIVES) or (
            namespace == "_c10d_functional" and name in FUNCTIONAL_COLLECTIVES
        ):
            kind = COLLECTIVES[name] if namespace == "c10d" else FUNCTIONAL_COLLECTIVES[name]
            payload = _payload(kind, name, args) if namespace == "c10d" else _size(args[0])
            self.bytes[kind] = self.bytes.get(kind, 0) + payload
            self.calls[kind] = self.calls.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _payload(kind: str, name: str, args: tuple) -> int:
    # argument 0 is the output for all-gather ops and the input(s) otherwise, except
    # reduce_scatter_tensor_coalesced_(outputs, inputs, ...) and _reduce_scatter_base_(output, input, ...)
    if kind == "all-gather":
        source = args[1]
    elif kind == "reduce-scatter":
        source = args[1]
    else:
        source = args[0]
    return _size(source)


def _size(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def ring_traffic_bytes(payload: dict[str, int], world_size: int) -> int:
    """Bytes one rank sends for the counted ``payload`` (from :class:`CommCounter`) with ring
    algorithms: all-reduce of N bytes sends 2(W-1)/W·N, reduce-scatter of an N-byte input
    (W-1)/W·N, all-gather of an N-byte shard (W-1)·N, broadcast of N bytes at most N."""
    w = world_size
    factors = {
        "all-reduce": 2 * (w - 1) / w,
        "reduce-scatter": (w - 1) / w,
        "all-gather": float(w - 1),
        "broadcast": 1.0,
        "send": 1.0,
        "recv": 0.0,
    }
    unknown = set(payload) - set(factors)
    if unknown:
        raise ValueError(f"unknown collective kinds {sorted(unknown)}")
    return int(sum(factors[k] * v for k, v in payload.items()))
