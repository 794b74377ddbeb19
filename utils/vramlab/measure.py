"""Measure the memory of a block of code, with one meaning on every device.

>>> with measure(model, optimizer) as m:
...     loss = model(x).sum(); loss.backward(); optimizer.step()
>>> print(m)            # peak, breakdown by role, and where the numbers came from

The primary numbers (``peak_bytes``, ``end_bytes``, ``baseline_bytes``, ``breakdown`` and
their deltas) are the same quantity on a CPU, on CUDA and in a dry run: the bytes of the live
tensor storages a :class:`~vramlab.tracker.StorageTracker` sees, that is what the block
allocates plus what it is given. An assert written against them on one device holds on the
others unless the kernels differ. On CUDA the caching allocator's own view comes beside them
under its own names (``allocated_*``, ``requested_*``, ``reserved_bytes``, ``device_used_bytes``):
it is process-wide (every live tensor, also ones the block was not given), rounds blocks, and
includes library workspaces; a cell that teaches the allocator uses those.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .allocator_stats import FIELDS, allocator_view
from .device import has_cuda
from .results import result_json
from .storages import CONTAINERS, tensors_in
from .tracker import ROLES, AllocHook, StorageTracker, TimelinePoint
from .units import format_bytes

NOTES = {
    "cpu-tracked": (
        "CPU tracker: bytes of live tensor storages, what the block made plus what it was given. "
        "A CPU has no allocator cache and no CUDA context to show."
    ),
    "dry-run": "Dry run under FakeTensorMode: exact tensor sizes of the real ops, no memory used.",
    "cuda": (
        "CUDA: peak/end/breakdown are the tracker's live tensor storages, as on a CPU; the allocator's "
        "view (process-wide, rounded to blocks, with workspaces and cache) is the allocated/reserved line."
    ),
}


@dataclass
class Measurement:
    """What a :func:`measure` block used. All sizes are in bytes.

    The same quantity on every device: ``peak_bytes`` and ``end_bytes`` are the live tensor
    storages the tracker counts, absolute (they include ``baseline_bytes``, what was given to
    ``measure`` and alive when the block started, plus storages made before the block that it
    wrote in place); ``breakdown`` splits the peak by role.

    On CUDA the allocator's view comes beside them (None on a CPU and in a dry run):
    ``allocated_*`` (``memory_allocated``: process-wide, whole blocks), ``requested_*`` (the
    sizes asked for, process-wide, no rounding), ``reserved_bytes``/``peak_reserved_bytes``
    (allocated plus the allocator's cache) and ``device_used_bytes`` (what nvidia-smi shows:
    reserved plus the CUDA context and other processes). ``not_counted`` names what was passed
    to ``measure`` on another device than the one measured.
    """

    source: str
    device: str
    baseline_bytes: int = 0
    peak_bytes: int = 0
    end_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    end_breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    allocated_baseline_bytes: int | None = None
    allocated_peak_bytes: int | None = None
    allocated_end_bytes: int | None = None
    requested_baseline_bytes: int | None = None
    requested_peak_bytes: int | None = None
    requested_end_bytes: int | None = None
    reserved_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    not_counted: list[str] = field(default_factory=list)
    timeline: list[TimelinePoint] | None = None
    ops: int = 0
    setup: Any = None  # the Setup a dry run measured; None for a plain block
    _live: Any = field(default=None, repr=False, compare=False)
    _allocator: Any = field(default=None, repr=False, compare=False)

    def current_bytes(self) -> int:
        """Live tracked bytes right now, also after the block has ended (every device).

        The storages the tracker knows (given to ``measure`` or created in the block) that are
        still alive; it keeps counting their frees after the block, so this shows what an
        exception or a forgotten reference still holds.
        """
        if self._live is None:
            raise RuntimeError("current_bytes() works once the measure block has started")
        return int(self._live())

    def allocated_now(self) -> int:
        """CUDA only: ``memory_allocated()`` right now (process-wide, whole allocator blocks)."""
        if self._allocator is None:
            raise RuntimeError(
                f"allocated_now() reads the CUDA allocator; this measurement ran on {self.device!r} "
                f"({self.source}). Use current_bytes(), which means the same on every device."
            )
        return int(self._allocator.allocated_now())

    @property
    def peak_delta_bytes(self) -> int:
        """How much the block added at its peak, above what was alive when it started."""
        return self.peak_bytes - self.baseline_bytes

    @property
    def end_delta_bytes(self) -> int:
        """How much the block left alive at its end, above what was alive when it started."""
        return self.end_bytes - self.baseline_bytes

    @property
    def allocated_peak_delta_bytes(self) -> int | None:
        """CUDA: ``max_memory_allocated`` during the block minus ``memory_allocated`` before it."""
        if self.allocated_peak_bytes is None or self.allocated_baseline_bytes is None:
            return None
        return self.allocated_peak_bytes - self.allocated_baseline_bytes

    @property
    def untracked_bytes(self) -> int:
        """CUDA: what the allocator's peak rise has beyond the tracker's (block rounding,
        workspaces, other threads); 0 where there is no allocator view. The two peaks need not
        fall at the same moment, so this is a size, not an inventory."""
        extra = self.allocated_peak_delta_bytes
        return max(extra - self.peak_delta_bytes, 0) if extra is not None else 0

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON types (bytes as ints); see :mod:`vramlab.results`."""
        return result_json(
            self,
            device=self.device,
            baseline_bytes=self.baseline_bytes,
            end_bytes=self.end_bytes,
            **{name: getattr(self, name) for name in FIELDS},
            untracked_bytes=self.untracked_bytes,
            not_counted=list(self.not_counted),
        )

    @property
    def note(self) -> str:
        """Where these numbers came from, in words."""
        return NOTES.get(self.source, self.source)

    def table(self) -> str:
        """A small text table of the breakdown at the peak."""
        lines = [f"{'role':<12}{'bytes':>16}  {'human':>12}"]
        for role in ROLES:
            lines.append(f"{role:<12}{self.breakdown[role]:>16,}  {format_bytes(self.breakdown[role]):>12}")
        lines.append(f"{'peak':<12}{self.peak_bytes:>16,}  {format_bytes(self.peak_bytes):>12}")
        return "\n".join(lines)

    def allocator_line(self) -> str | None:
        """CUDA: the allocator's view in one line; None without one."""
        if self.allocated_peak_bytes is None:
            return None
        assert self.allocated_end_bytes is not None and self.reserved_bytes is not None
        line = (
            f"allocator (process-wide): allocated peak {format_bytes(self.allocated_peak_bytes)}, "
            f"end {format_bytes(self.allocated_end_bytes)}; reserved {format_bytes(self.reserved_bytes)}"
        )
        if self.device_used_bytes is not None:
            line += f"; device used {format_bytes(self.device_used_bytes)}"
        return line

    def __str__(self) -> str:
        head = (
            f"[{self.source} on {self.device}] peak {format_bytes(self.peak_bytes)} "
            f"(+{format_bytes(self.peak_delta_bytes)} over the {format_bytes(self.baseline_bytes)} "
            f"alive at the start), end {format_bytes(self.end_bytes)}"
        )
        extra = [line for line in (self.allocator_line(), *self.not_counted) if line]
        return "\n".join([head, self.table(), *extra, self.note])


def _fake_mode_active() -> bool:
    return any(isinstance(mode, FakeTensorMode) for mode in _get_current_dispatch_mode_stack())


def _tracked(track: tuple[Any, ...]) -> tuple[list[Any], list[torch.Tensor]]:
    """Split what ``measure`` was given into modules/optimizers and tensors.

    Lists, tuples, sets, dicts and iterators (``model.parameters()``) are opened; an object
    that holds no tensor and is no module or optimizer (None, a number, an empty list) is
    refused, so a typo never measures nothing in silence.
    """
    holders: list[Any] = []
    tensors: list[torch.Tensor] = []
    for position, obj in enumerate(track):
        found = _open(obj, holders, tensors)
        if not found:
            raise TypeError(
                f"measure(...) argument {position + 1} ({type(obj).__name__}: {obj!r:.60}) holds no tensor, "
                "module or optimizer. Pass what is alive before the block (the model, the optimizer, "
                "the batch), or nothing."
            )
    return holders, tensors


def _open(obj: Any, holders: list[Any], tensors: list[torch.Tensor]) -> int:
    """Add the modules/optimizers and tensors inside ``obj``; return how many were found."""
    if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
        holders.append(obj)
        return 1
    if isinstance(obj, torch.Tensor):
        tensors.extend(tensors_in(obj))
        return 1
    if isinstance(obj, Mapping):
        obj = obj.values()
    if isinstance(obj, CONTAINERS):
        return sum(_open(item, holders, tensors) for item in list(obj))
    return 0


def _held_tensors(holders: list[Any]) -> list[torch.Tensor]:
    """The parameters and buffers of the modules and optimizers (not optimizer state: a CUDA
    AdamW keeps its step counters on the CPU, which says nothing about where the model is)."""
    found: list[torch.Tensor] = []
    for obj in holders:
        if isinstance(obj, torch.nn.Module):
            found.extend(obj.parameters())
            found.extend(obj.buffers())
        else:
            found.extend(p for group in obj.param_groups for p in group["params"])
    return found


def _device_of(holders: list[Any], tensors: list[torch.Tensor]) -> str:
    """What is being measured: a GPU if any tracked model, optimizer or tensor is on one (the
    model's parameters decide, never the order of the arguments); else the one device type of
    the tracked tensors; with none, the default device (``torch.set_default_device``)."""
    types = {t.device.type for t in [*_held_tensors(holders), *tensors]}
    if "cuda" in types:
        return "cuda"
    if len(types) == 1:
        return types.pop()
    if "cpu" in types:  # cpu beside meta or another type: measure the one with memory
        return "cpu"
    if types:
        return sorted(types)[0]
    if _fake_mode_active():
        return "cpu"
    return torch.get_default_device().type


def _elsewhere(holders: list[Any], tensors: list[torch.Tensor], device: str) -> list[str]:
    """One line per device type the tracked objects use besides ``device``: not counted."""
    others: dict[str, list[torch.Tensor]] = {}
    for tensor in [*_held_tensors(holders), *tensors]:
        if tensor.device.type != device:
            others.setdefault(tensor.device.type, []).append(tensor)
    lines = []
    for kind, found in others.items():
        nbytes = sum({id(st): st.nbytes() for t in found for st in [t.untyped_storage()]}.values())
        lines.append(
            f"not counted: {len(found)} tensor(s) on {kind} ({format_bytes(nbytes)}) passed to measure; "
            f"this measures {device}"
        )
    return lines


def _check_device(device: Any, inferred: bool) -> str:
    if isinstance(device, torch.device):
        device = device.type
    if isinstance(device, str) and device.split(":")[0] in ("cpu", "cuda"):
        kind, _, index = device.partition(":")
        if index and not index.isdigit():
            raise ValueError(f"device {device!r} has no valid index; use 'cuda', 'cuda:0' or 'cpu'")
        return kind
    origin = "the tracked tensors are on" if inferred else "got device"
    if device == "meta":
        raise ValueError(
            f"{origin} 'meta': meta tensors have shapes but no memory to measure. For the memory of "
            "a model too big to build, dry-run it: vramlab.dryrun(...), or measure under FakeTensorMode."
        )
    raise ValueError(f"measure works on 'cpu' or 'cuda'; {origin} {device!r}. Move the tensors, or pass device=.")


class measure:
    """Context manager: measure peak and current memory of the code inside it.

    Args:
        *track: objects alive before the block whose bytes count (modules, optimizers,
            tensors, or lists/dicts/iterators of them such as ``model.parameters()``);
            a module's parameters and future gradients get their roles.
        device: "cpu" or "cuda" (or "cuda:0"); default: a GPU if any tracked model, optimizer
            or tensor is on one, else where the tracked tensors live, else the default device
            (CPU unless ``torch.set_default_device`` says otherwise). Tracked tensors on another
            device are not counted, and ``Measurement.not_counted`` says so.
        timeline: record live bytes after every op (``Measurement.timeline``).
        round_to: round each storage up to this many bytes (an int >= 1; 512 mimics the CUDA
            allocator's small blocks, not its large-block rules).

    ``peak_bytes``, ``end_bytes`` and ``breakdown`` mean the same on every device (the tracker's
    live storages); on CUDA the allocator's numbers come beside them under their own names.
    One ``measure`` object may be entered again: each block gets a new :class:`Measurement`.
    Only the thread that runs the block is seen (a dispatch mode is thread-local): other
    threads' tensors and ``optimizer.step()`` calls are not counted. An array that existed before
    the block and is wrapped in it (``torch.from_numpy``) is not an allocation; growth in place
    (``resize_``, a resizing ``out=``) is. On CUDA the
    allocator has one peak counter: a ``measure`` (or ``budget``) nested inside another resets
    it, so the outer block's ``allocated_peak_bytes`` is then the inner's; its tracker numbers
    are unaffected.
    """

    def __init__(
        self,
        *track: Any,
        device: str | torch.device | None = None,
        timeline: bool = False,
        round_to: int = 1,
    ) -> None:
        holders, tensors = _tracked(track)
        self.device = _check_device(device if device is not None else _device_of(holders, tensors), device is None)
        if self.device == "cuda" and not has_cuda():
            from .device import require_cuda

            require_cuda("measure(device='cuda')")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to is a whole number of bytes >= 1 (512 mimics CUDA's blocks), got {round_to!r}")
        self._not_counted = _elsewhere(holders, tensors, self.device)
        self._holders = holders  # modules and optimizers: the final role pass needs them
        self._tensors = [weakref.ref(t) for t in tensors]  # weak: measuring must not keep them alive
        self._timeline = timeline
        self._round_to = round_to
        self._alloc_hooks: list[AllocHook] = []
        self._active = False
        self.tracker: StorageTracker | None = None
        self.result: Measurement | None = None

    def add_alloc_hook(self, hook: AllocHook) -> None:
        """Run ``hook(in_use, request)`` on every allocation of the blocks (how a budget refuses)."""
        self._alloc_hooks.append(hook)

    def _source(self) -> str:
        if self.device == "cuda":
            return "cuda"
        return "dry-run" if _fake_mode_active() else "cpu-tracked"

    def __enter__(self) -> Measurement:
        if self._active:
            raise RuntimeError("this measure object is already measuring a block; nest a new measure(...) instead")
        tracker = StorageTracker(self.device, timeline=self._timeline, round_to=self._round_to)
        self.tracker, self.result = tracker, Measurement(source=self._source(), device=self.device)
        result = self.result
        result.not_counted = list(self._not_counted)
        tracker.set_phase("before")
        for obj in self._holders:
            tracker.register(obj)
        tensors = [t for t in (ref() for ref in self._tensors) if t is not None]
        for tensor in tensors:
            tracker.register(tensor, "parameters" if isinstance(tensor, torch.nn.Parameter) else None)
        del tensors
        tracker.set_phase(None)
        result.baseline_bytes = result.peak_bytes = result.end_bytes = tracker.current_bytes
        result._live = lambda: tracker.current_bytes
        allocator = allocator_view(self.device)  # None on a CPU, in a dry run too
        if allocator is not None:
            result._allocator = allocator
            for name, value in allocator.begin().items():
                setattr(result, name, value)
        for hook in self._alloc_hooks:
            tracker.add_alloc_hook(hook)
        tracker.__enter__()
        self._active = True
        return result

    def __exit__(self, *exc: Any) -> None:
        tracker, result = self.tracker, self.result
        assert tracker is not None and result is not None
        self._active = False
        tracker.__exit__(*exc)
        for obj in self._holders:  # final roles: gradients and states that now exist
            tracker.assign_roles(obj)
        result.breakdown = tracker.peak_breakdown()
        result.end_breakdown = tracker.breakdown()
        result.baseline_bytes += tracker.adopted_bytes  # alive before the block, found when written
        result.peak_bytes = tracker.peak_bytes
        result.end_bytes = tracker.current_bytes
        result.timeline = tracker.timeline
        result.ops = tracker.ops
        if result._allocator is not None:
            for name, value in result._allocator.end().items():
                setattr(result, name, value)


def live_bytes(*objs: Any) -> int:
    """Bytes of the distinct storages behind ``objs`` right now (after a garbage collection)."""
    from .storages import storage_bytes

    gc.collect()
    return storage_bytes(list(objs))
