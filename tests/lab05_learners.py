"""Learners' answers to Lab 5, in a file so that their source can be sent to the ranks."""
# ruff: noqa: F821  (the ranks provide torch, fully_shard, DistributedDataParallel, ZeroRedundancyOptimizer)


def ddp(model):
    model = DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)


def zero1(model):
    model = DistributedDataParallel(model)
    return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=3e-3, foreach=True)


def no_sync(model):
    """Each rank trains alone on its half, with a stateless optimizer: fits, but trains another model."""
    return model, torch.optim.SGD(model.parameters(), lr=3e-3)


def full_copy_on_the_side(model):
    """Shards, but keeps a full fp32 copy of the weights "for later": counted, since shard runs in the block."""
    import copy

    spare = copy.deepcopy(model.gpt)
    for block in model.gpt.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)
    opt.spare = spare
    return model, opt


def returns_nothing(model):
    return None


def only_the_lab_model(model):
    """FSDP, but written for the lab's widths only: fails on any other model."""
    if model.gpt.cfg.hidden != 256:
        raise ValueError("this shard only knows hidden size 256")
    for block in model.gpt.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)


def ddp_on_host(model):
    """Review (labs) E1b: plain DDP with vramlab's on_host() entered for the rest of the run."""
    import vramlab.tracker as T

    model.__dict__["_keep"] = T.on_host()
    model.__dict__["_keep"].__enter__()
    model = DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)


def ddp_modes_swapped(model):
    """Review (labs) E2: plain DDP after popping the check's dispatch modes and pushing inert look-alikes."""
    from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack, _pop_mode, _push_mode

    class Inert(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    depth = len(_get_current_dispatch_mode_stack())
    for _ in range(depth):
        _pop_mode()
    for _ in range(depth):
        _push_mode(Inert())
    model = DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)


def fsdp(model):
    """The lab's answer: fully_shard per block, then at the root."""
    for block in model.gpt.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)
