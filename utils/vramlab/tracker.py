"""A dispatch-level tracker of live tensor storages: the CPU stand-in for CUDA's allocator stats.

Every ATen op passes through :class:`StorageTracker`. Each storage the op returns that the
tracker has not seen is recorded with its size in bytes, the phase it was born in
(forward / backward / optimizer) and, where known, its role (parameter, gradient, optimizer
state). A ``weakref.finalize`` on the storage removes it when its last reference dies, so
``current_bytes`` is the bytes of live storages, which is what ``torch.cuda.memory_allocated``
counts on a GPU, before the CUDA caching allocator rounds each block up to 512 bytes. The
peak is sampled after every op, while the op's inputs and outputs are both alive.

Storages allocated before the tracker started and not registered: one the block only reads
(a slice of a dataset, a batch from ``torch.from_numpy``, also one made inside the block from
an array that existed before it) is not counted; one the block writes
in place (DDP's gradient buckets, made when DDP wraps the model; parameters an untracked
optimizer updates) is memory the step uses, so it is *adopted*: counted from then on, with
role "other" and phase "before", in ``adopted_bytes``, and never as an allocation of the block.

What the tracker cannot see: memory a kernel allocates internally and frees before returning
(e.g. a cuBLAS or oneDNN workspace), memory that is not a tensor (the CUDA context, the
allocator's cache), and ops run on other threads (a dispatch mode is thread-local: a
DataLoader's pin-memory thread is not seen; nor is another thread's ``optimizer.step()``,
although PyTorch's step hooks are global). Growth in place (``resize_``, an ``out=`` that
resizes) is counted, and offered to the allocation hooks just after it happened, since its
size is known only then. So is ``UntypedStorage.resize_``, which no dispatch mode sees: FSDP2
frees a gathered parameter with ``resize_(0)`` and gathers it again with ``resize_(size)``, so
while a tracker is active that method is wrapped to report each resize to it.

A caller that knows what a block of work makes (FSDP2's all-gather, its gradient reduction)
says so with :meth:`StorageTracker.labelled`: storages born (or grown from nothing) in the block
get that role and a finer ``part`` name, until a parameter, gradient or optimizer role given by
registration overrides them.

Work that a real run does in the host's memory (an optimizer offloaded to the CPU) says so
with :func:`on_host`: while it is active no tracker records, adopts or limits anything, so a
CPU emulation of a GPU run can keep its "host" tensors out of the "device" count.

The tracker enforces nothing. Whoever needs a limit (:func:`vramlab.budget`) adds an
allocation hook with :meth:`StorageTracker.add_alloc_hook`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.optim.optimizer as optim_hooks
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from .results import ROLES
from .storages import real_storages, tensors_in

PHASES: tuple[str, ...] = ("before", "forward", "backward", "optimizer")

_host = threading.local()


@contextlib.contextmanager
def on_host() -> Iterator[None]:
    """Run the block as host-memory work: no :class:`StorageTracker` in this thread records,
    adopts or limits what it allocates or writes (the device does not hold it)."""
    _host.depth = getattr(_host, "depth", 0) + 1
    try:
        yield
    finally:
        _host.depth -= 1


def _on_host() -> bool:
    return getattr(_host, "depth", 0) > 0


@dataclass
class Record:
    """One live storage: its size in bytes, the phase it was born in, and its role if known."""

    nbytes: int
    phase: str
    op: str
    role: str | None = None
    part: str | None = None  # a finer name given by StorageTracker.labelled ("gathered parameters")

    @property
    def resolved_role(self) -> str:
        """The role used in breakdowns: an explicit role, else activations for what the
        forward pass created and still holds, else other."""
        if self.role is not None:
            return self.role
        return "activations" if self.phase == "forward" else "other"


@dataclass
class TimelinePoint:
    """Live bytes after one op."""

    index: int
    op: str
    phase: str
    live_bytes: int


AllocHook = Callable[[int, int], None]
"""``hook(in_use, request)``: called with the bytes alive and the bytes an op is about to
allocate (before the op when its output sizes can be computed on meta tensors, else after
it, once per new storage). A hook that raises stops the op; the tracker frees what the op
returned before the error propagates."""


class StorageTracker(TorchDispatchMode):
    """Track live storages on one device type.

    Args:
        device_type: only storages of tensors on this device type count ("cpu", "cuda").
        timeline: keep a :class:`TimelinePoint` after every op.
        round_to: round every storage up to a multiple of this many bytes (512 mimics CUDA).
    """

    def __init__(
        self,
        device_type: str = "cpu",
        timeline: bool = False,
        round_to: int = 1,
    ) -> None:
        super().__init__()
        self.device_type = device_type
        self._alloc_hooks: list[AllocHook] = []
        self.round_to = max(int(round_to), 1)
        self.timeline: list[TimelinePoint] | None = [] if timeline else None
        self.current_bytes = 0
        self.adopted_bytes = 0
        self.peak_bytes = 0
        self.peak_records: list[Record] = []
        self._peak_sizes: list[int] = []  # each peak record's bytes at the peak (a resize may change it later)
        self.ops = 0
        self._live: dict[int, Record] = {}
        self._keys: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._counter = itertools.count()
        self._in_optimizer = 0
        self._phase_override: str | None = None
        self._hooks: list[Any] = []
        self._thread = threading.get_ident()
        self._label: tuple[str, str] | None = None
        self.moment: Callable[[], str] | None = None  # names where the step is, called at each new peak
        self.peak_moment: str | None = None

    def add_alloc_hook(self, hook: AllocHook) -> None:
        """Call ``hook(in_use, request)`` (bytes) for every allocation; see :data:`AllocHook`."""
        self._alloc_hooks.append(hook)

    def close(self) -> None:
        """Remove every hook this tracker put on parameters and optimizers."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # -- registration -------------------------------------------------------------------
    def register(self, obj: Any, role: str | None = None) -> None:
        """Count the storages behind ``obj`` (tensor, module, optimizer, or a collection).

        A module's parameters get the role "parameters" and their gradients "gradients";
        an optimizer's state gets "optimizer"; a plain tensor gets ``role`` (default other).
        """
        if isinstance(obj, torch.nn.Module):
            self.watch_module(obj)
            for buf in obj.buffers():
                self._register_tensor(buf, "other")
        elif isinstance(obj, torch.optim.Optimizer):
            self.mark_optimizer(obj)
        else:
            for tensor in tensors_in(obj):
                self._register_tensor(tensor, role or "other")
        self._update_peak()

    def watch_module(self, module: torch.nn.Module, hooks: bool = True) -> None:
        """Register a module's parameters and (with ``hooks``) make their future gradients
        count as gradients; the hooks live until :meth:`close` (or the block's exit)."""
        for param in module.parameters():
            self._register_tensor(param, "parameters")
            if param.grad is not None:
                self._register_tensor(param.grad, "gradients")
            if hooks and param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    def assign_roles(self, obj: Any) -> None:
        """Give the storages of a module or optimizer their roles (no new hooks): for the
        final pass after the block, when gradients and optimizer states exist."""
        if isinstance(obj, torch.nn.Module):
            self.watch_module(obj, hooks=False)
        elif isinstance(obj, torch.optim.Optimizer):
            self.mark_optimizer(obj)

    def mark_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the roles parameters / gradients / optimizer to an optimizer's tensors."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                self._register_tensor(param, "parameters")
                if param.grad is not None:
                    self._register_tensor(param.grad, "gradients")
        for state in optimizer.state.values():
            for tensor in tensors_in(state):
                self._register_tensor(tensor, "optimizer")

    @contextlib.contextmanager
    def labelled(self, role: str, part: str) -> Iterator[None]:
        """Storages born in the block, or grown there from zero bytes, get ``role`` (one of
        :data:`~vramlab.results.ROLES`) and ``part``."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {ROLES}")
        outer, self._label = self._label, (role, part)
        try:
            yield
        finally:
            self._label = outer

    def label(self, tensor: torch.Tensor, role: str, part: str) -> None:
        """Give the storages of ``tensor`` (known or not) ``role`` and ``part``."""
        for record in self._register_tensor(tensor, role, "label") + self._known(tensor):
            record.role, record.part = role, part
        self._update_peak()

    def _known(self, tensor: torch.Tensor) -> list[Record]:
        if tensor.device.type != self.device_type:
            return []
        return [r for r in (self._keys.get(st) for st in real_storages(tensor)) if r is not None]

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._register_tensor(param.grad, "gradients")

    def _register_tensor(
        self, tensor: torch.Tensor, role: str | None, op: str = "register", foreign: frozenset[int] = frozenset()
    ) -> list[Record]:
        """Record the storages of ``tensor``; those whose id is in ``foreign`` (storages of
        the op's inputs that the tracker never saw: allocated before it started) are skipped,
        and so is every unknown storage when ``op`` is None (only sizes of known ones refresh)."""
        if tensor.device.type != self.device_type:
            return []
        new = []
        for storage in real_storages(tensor):
            record = self._keys.get(storage)
            nbytes = self._rounded(storage.nbytes())
            if record is None and (op is None or id(storage) in foreign):
                continue
            if record is None:
                record = Record(nbytes, self.phase, op, role)
                if role is None and self._label is not None:
                    record.role, record.part = self._label
                key = next(self._counter)
                self._live[key] = record
                self._keys[storage] = record
                weakref.finalize(storage, self._on_free, key)
                self.current_bytes += nbytes
                new.append(record)
            else:
                if role is not None:
                    record.role, record.part = role, None  # a state's role, given by registration
                if record.nbytes != nbytes:  # a storage resized in place
                    self.current_bytes += nbytes - record.nbytes
                    record.nbytes = nbytes
        return new

    def _is_parameter(self, tensor: Any) -> bool:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device_type:
            return False
        records = [self._keys.get(st) for st in real_storages(tensor)]
        return bool(records) and all(r is not None and r.role == "parameters" for r in records)

    def _rounded(self, nbytes: int) -> int:
        if self.round_to == 1:
            return nbytes
        return max(-(-nbytes // self.round_to), 1) * self.round_to

    def _on_free(self, key: int) -> None:
        record = self._live.pop(key, None)
        if record is not None:
            self.current_bytes -= record.nbytes

    # -- phases -------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """Where the step is now: "backward" inside autograd, "optimizer" inside
        ``optimizer.step()``, else "forward" (or an override set by :meth:`set_phase`)."""
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        if self._in_optimizer:
            return "optimizer"
        return self._phase_override or "forward"

    def set_phase(self, phase: str | None) -> None:
        """Label what is created from now on (e.g. "before" while loading a model)."""
        if phase is not None and phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; use one of {PHASES}")
        self._phase_override = phase

    def __enter__(self) -> StorageTracker:
        self._thread = threading.get_ident()
        self._hooks.append(optim_hooks.register_optimizer_step_pre_hook(self._step_pre))
        self._hooks.append(optim_hooks.register_optimizer_step_post_hook(self._step_post))
        _watch_resizes(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            _unwatch_resizes(self)
            self.close()

    def _sees_resize(self, storage: torch.UntypedStorage) -> bool:
        """Whether a ``resize_`` of ``storage`` happening now is this tracker's to count: in
        its thread, or in a thread that runs under it (autograd runs a CUDA backward on a worker
        thread that inherits the dispatch modes), not host work, on its device (a storage on
        "meta" only under a fake mode, where every tensor's storage is on meta)."""
        if _on_host():
            return False
        if threading.get_ident() != self._thread and self not in _get_current_dispatch_mode_stack():
            return False
        kind = storage.device.type
        if kind == "meta":
            return self.device_type != "meta" and any(
                isinstance(mode, FakeTensorMode) for mode in _get_current_dispatch_mode_stack()
            )
        return kind == self.device_type

    def _resize_request(self, storage: torch.UntypedStorage, size: int) -> None:
        """Before ``storage.resize_(size)``: offer the growth to the allocation hooks (a hook
        that raises stops the resize)."""
        if not self._alloc_hooks or not self._sees_resize(storage):
            return
        record = self._keys.get(storage)
        grown = (self._rounded(size) if size else 0) - (record.nbytes if record is not None else 0)
        if grown > 0:
            self._call_hooks(self.current_bytes, grown)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """``storage.resize_`` just ran: count the new size (an allocation if the storage was
        unknown or empty, a free when it shrank to zero)."""
        if not self._sees_resize(storage):
            return
        nbytes = self._rounded(storage.nbytes()) if storage.nbytes() else 0
        record = self._keys.get(storage)
        if record is None:
            if not nbytes:
                return
            record = Record(0, self.phase, "resize_")
            if self._label is not None:
                record.role, record.part = self._label
            key = next(self._counter)
            self._live[key] = record
            self._keys[storage] = record
            weakref.finalize(storage, self._on_free, key)
        elif record.nbytes == 0 and nbytes and record.role is None and self._label is not None:
            record.role, record.part = self._label  # grown from nothing inside a labelled block
        self.current_bytes += nbytes - record.nbytes
        record.nbytes = nbytes
        self._update_peak()

    def _step_pre(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if threading.get_ident() == self._thread:  # the hooks are global: other threads' steps are not ours
            self._in_optimizer += 1

    def _step_post(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        self._in_optimizer -= 1
        if not _on_host():
            self.mark_optimizer(optimizer)

    # -- the dispatch hook --------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _on_host():
            return func(*args, **kwargs)
        if self._alloc_hooks:
            needed = _new_output_bytes(func, args, kwargs, self.device_type, self._rounded)
            if needed:
                self._call_hooks(self.current_bytes, needed)
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        before, adopted = self.current_bytes, self.adopted_bytes
        new = self._account(func, name, out, args, kwargs)
        # a storage that grew in place (resize_, an out= that resizes) is checked just after it grew
        grown = self.current_bytes - before - (self.adopted_bytes - adopted) - sum(r.nbytes for r in new)
        if self._alloc_hooks and (new or grown > 0):
            try:
                running = before
                for record in new:
                    self._call_hooks(running, record.nbytes)
                    running += record.nbytes
                if grown > 0:
                    self._call_hooks(running, grown)
            except BaseException:
                del out  # let the outputs die before the error propagates
                raise
        self._update_peak()
        if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):  # skip queries like prim.device
            self.ops += 1
            if self.timeline is not None:
                self.timeline.append(TimelinePoint(self.ops, name, self.phase, self.current_bytes))
        return out

    def _call_hooks(self, in_use: int, request: int) -> None:
        for hook in self._alloc_hooks:
            hook(in_use, request)

    def _account(self, func: Any, name: str, out: Any, args: tuple, kwargs: dict) -> list[Record]:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        # torch.tensor(...) made its input just now; torch.from_numpy / as_tensor(array) wrap memory that
        # already existed (a storage that is not resizable: NumPy owns it), which is not an allocation
        fresh = name in ("lift_fresh", "lift_fresh_copy")
        foreign = frozenset(
            id(st)
            for t in inputs
            if t.device.type == self.device_type
            for st in real_storages(t)
            if self._keys.get(st) is None and (not fresh or not st.resizable())
        )
        new: list[Record] = []
        role = "other" if name == "_to_copy" and self._is_parameter(args[0]) else None  # autocast's weight copies
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                new.extend(self._register_tensor(tensor, role, name, foreign))
        if func._schema.is_mutable:  # resize_ / set_ on a known input: refresh its size
            for tensor in inputs:
                self._register_tensor(tensor, None, None)
            for storage in _written_storages(func, args, kwargs, self.device_type):
                if id(storage) in foreign and self._keys.get(storage) is None:
                    self._adopt(storage)
        return new

    def _adopt(self, storage: torch.UntypedStorage) -> None:
        """Count a storage that existed before the tracker and is written in the block."""
        record = Record(self._rounded(storage.nbytes()), "before", "adopted", "other")
        key = next(self._counter)
        self._live[key] = record
        self._keys[storage] = record
        weakref.finalize(storage, self._on_free, key)
        self.current_bytes += record.nbytes
        self.adopted_bytes += record.nbytes

    def _update_peak(self) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_records = list(self._live.values())
            self._peak_sizes = [record.nbytes for record in self.peak_records]
            if self.moment is not None:
                self.peak_moment = self.moment()

    # -- results ------------------------------------------------------------------------
    def breakdown(self, records: list[Record] | None = None, sizes: list[int] | None = None) -> dict[str, int]:
        """Bytes by role of ``records`` (default: the storages alive now), of ``sizes`` if given
        (one per record), else of each record's size now."""
        records = list(self._live.values()) if records is None else records
        result = dict.fromkeys(ROLES, 0)
        for record, nbytes in zip(records, sizes if sizes is not None else [r.nbytes for r in records]):
            result[record.resolved_role] += nbytes
        return result

    def peak_items(self) -> list[tuple[Record, int]]:
        """The storages alive at the peak, each with its bytes at that moment (its role is
        the one known now: roles given after the peak count)."""
        return list(zip(self.peak_records, self._peak_sizes))

    def live_records(self) -> list[Record]:
        """The storages alive now, one :class:`Record` each (a copy: safe to keep)."""
        return list(self._live.values())

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes by role of the storages that were alive at the peak."""
        return self.breakdown(self.peak_records, self._peak_sizes)


_resize_watchers: list[StorageTracker] = []
_outer_resize: list[Any] = []  # the resize_ installed when the first tracker entered (another patcher's, or torch's)


def _tracked_resize(storage: torch.UntypedStorage, size: int) -> Any:
    watchers = list(_resize_watchers)
    for tracker in watchers:
        tracker._resize_request(storage, size)
    out = _outer_resize[-1](storage, size)
    for tracker in watchers:
        tracker._resized(storage)
    return out


def _watch_resizes(tracker: StorageTracker) -> None:
    """Report every ``UntypedStorage.resize_`` to ``tracker`` until :func:`_unwatch_resizes`.
    The method is wrapped while any tracker is active; the wrapper calls the ``resize_`` that
    was installed when the first tracker entered (so a patch of another tool, such as PyTorch's
    MemTracker, keeps working), and that one is put back after the last tracker leaves, unless
    someone replaced the wrapper meanwhile."""
    if not _resize_watchers:
        _outer_resize.append(torch.UntypedStorage.resize_)
        torch.UntypedStorage.resize_ = _tracked_resize  # type: ignore[method-assign]
    _resize_watchers.append(tracker)


def _unwatch_resizes(tracker: StorageTracker) -> None:
    if tracker in _resize_watchers:
        _resize_watchers.remove(tracker)
        if not _resize_watchers:
            outer = _outer_resize.pop()
            if torch.UntypedStorage.resize_ is _tracked_resize:
                torch.UntypedStorage.resize_ = outer  # type: ignore[method-assign]


def _written_storages(func: Any, args: tuple, kwargs: dict, device_type: str) -> Iterator[torch.UntypedStorage]:
    """The storages of the arguments ``func``'s schema marks as written (``Tensor(a!)``)."""
    for index, argument in enumerate(func._schema.arguments):
        alias = argument.alias_info
        if alias is None or not alias.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        for tensor in tree_flatten(value)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == device_type:
                yield from real_storages(tensor)


def _new_output_bytes(
    func: Any, args: tuple, kwargs: dict, device_type: str, rounded: Callable[[int], int]
) -> int | None:
    """Bytes of the new storages ``func`` would return, computed on meta tensors (no memory).

    Returns None when the op cannot run on meta tensors; the tracker then checks afterwards.
    """
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if any(type(t) is not torch.Tensor or t.device.type != device_type for t in tensors):
        return None
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != device_type:
        return None
    try:
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        if "device" in meta_kwargs or not tensors:  # a factory op: build it on meta too
            meta_kwargs["device"] = "meta"
        meta_out = func(*meta_args, **meta_kwargs)
    except Exception:  # no meta kernel, or an op with data-dependent output shapes
        return None
    inputs = {id(t.untyped_storage()) for t in tree_flatten((meta_args, meta_kwargs))[0] if isinstance(t, torch.Tensor)}
    total, seen = 0, set()
    for tensor in tree_flatten(meta_out)[0]:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            if id(storage) not in inputs and id(storage) not in seen:
                seen.add(id(storage))
                total += rounded(storage.nbytes())
    return total
