"""Measure the memory of a block of code, with one call shape on every device.

>>> with measure(model, optimizer) as m:
...     loss = model(x).sum(); loss.backward(); optimizer.step()
>>> print(m)            # peak, breakdown by role, and where the numbers came from

On CUDA the peak comes from the caching allocator (``max_memory_allocated``), the truth a GPU
run is judged by; the storage tracker runs beside it only to split the bytes by role. On a
CPU the tracker is the measurement. Under ``FakeTensorMode`` the tracker measures a dry run:
exact tensor sizes, no memory used. ``Measurement.source`` says which of these it was.
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

from .device import has_cuda
from .results import result_json
from .storages import CONTAINERS, tensors_in
from .tracker import ROLES, AllocHook, StorageTracker, TimelinePoint
from .units import format_bytes

NOTES = {
    "cpu-tracked": (
        "CPU tracker: bytes of live tensor storages (what CUDA's memory_allocated counts, "
        "without its 512-byte rounding). A CPU has no allocator cache and no CUDA context to show."
    ),
    "dry-run": "Dry run under FakeTensorMode: exact tensor sizes of the real ops, no memory used.",
    "cuda": "CUDA caching allocator: peak = max_memory_allocated; reserved includes the allocator's cache.",
}


@dataclass
class Measurement:
    """What a :func:`measure` block used. All sizes are in bytes.

    ``peak_bytes`` and ``end_bytes`` are absolute (they include ``baseline_bytes``, what was
    alive and known when the block started); ``breakdown`` splits the peak by role.
    """

    source: str
    device: str
    baseline_bytes: int = 0
    peak_bytes: int = 0
    end_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    end_breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    reserved_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    untracked_bytes: int = 0
    timeline: list[TimelinePoint] | None = None
    ops: int = 0
    setup: Any = None  # the Setup a dry run measured; None for a plain block
    _live: Any = field(default=None, repr=False, compare=False)

    def current_bytes(self) -> int:
        """Live bytes right now, also after the block has ended.

        On a CPU: the storages the tracker knows (tracked or created in the block) that are
        still alive; it keeps counting their frees after the block, so this shows what an
        exception or a forgotten reference still holds. On CUDA: ``memory_allocated()``.
        """
        if self._live is None:
            raise RuntimeError("current_bytes() works once the measure block has started")
        return int(self._live())

    @property
    def peak_delta_bytes(self) -> int:
        """How much the block added at its peak, above what was alive when it started."""
        return self.peak_bytes - self.baseline_bytes

    @property
    def end_delta_bytes(self) -> int:
        """How much the block left alive at its end, above what was alive when it started."""
        return self.end_bytes - self.baseline_bytes

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON types (bytes as ints); see :mod:`vramlab.results`."""
        return result_json(
            self,
            device=self.device,
            baseline_bytes=self.baseline_bytes,
            end_bytes=self.end_bytes,
            reserved_bytes=self.reserved_bytes,
            peak_reserved_bytes=self.peak_reserved_bytes,
            device_used_bytes=self.device_used_bytes,
            untracked_bytes=self.untracked_bytes,
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
        if self.untracked_bytes:
            lines.append(f"{'untracked':<12}{self.untracked_bytes:>16,}  {format_bytes(self.untracked_bytes):>12}")
        lines.append(f"{'peak':<12}{self.peak_bytes:>16,}  {format_bytes(self.peak_bytes):>12}")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (
            f"[{self.source} on {self.device}] peak {format_bytes(self.peak_bytes)} "
            f"(+{format_bytes(self.peak_delta_bytes)} over the {format_bytes(self.baseline_bytes)} "
            f"alive at the start), end {format_bytes(self.end_bytes)}"
        )
        if self.reserved_bytes is not None:
            head += f", reserved {format_bytes(self.reserved_bytes)}"
        return f"{head}\n{self.table()}\n{self.note}"


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


def _device_of(holders: list[Any], tensors: list[torch.Tensor]) -> str:
    """Where the tracked objects live; with none, the default device (``torch.set_default_device``)."""
    for tensor in [*tensors, *tensors_in(holders)]:
        return tensor.device.type
    if _fake_mode_active():
        return "cpu"
    return torch.get_default_device().type


def _check_device(device: Any, inferred: bool) -> str:
    if isinstance(device, torch.device):
        device = device.type
    if device in ("cpu", "cuda"):
        return device
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
        device: "cpu" or "cuda"; default: where the tracked objects live, else the default
            device (CPU unless ``torch.set_default_device`` says otherwise).
        timeline: record live bytes after every op (``Measurement.timeline``).
        round_to: round each storage up to this many bytes (512 mimics the CUDA allocator).

    One ``measure`` object may be entered again: each block gets a new
    :class:`Measurement`. Only the thread that runs the block is seen (a dispatch mode is
    thread-local). On CUDA the device has one peak counter: a ``measure`` (or ``budget``)
    nested inside another resets it, so read the outer block's ``current_bytes()``, not its
    peak, there.
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
        tracker.set_phase("before")
        for obj in self._holders:
            tracker.register(obj)
        tensors = [t for t in (ref() for ref in self._tensors) if t is not None]
        for tensor in tensors:
            tracker.register(tensor, "parameters" if isinstance(tensor, torch.nn.Parameter) else None)
        del tensors
        tracker.set_phase(None)
        result = self.result
        result.baseline_bytes = result.peak_bytes = result.end_bytes = tracker.current_bytes
        result._live = lambda: tracker.current_bytes
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            result.baseline_bytes = int(torch.cuda.memory_allocated())
            result._live = torch.cuda.memory_allocated
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
        if self.device != "cuda":  # CUDA's baseline (memory_allocated) already holds them
            result.baseline_bytes += tracker.adopted_bytes  # alive before the block, found when written
        result.peak_bytes = tracker.peak_bytes
        result.end_bytes = tracker.current_bytes
        result.timeline = tracker.timeline
        result.ops = tracker.ops
        if self.device == "cuda":
            self._read_cuda(result)

    def _read_cuda(self, result: Measurement) -> None:
        torch.cuda.synchronize()
        tracked_peak = result.peak_bytes
        result.peak_bytes = int(torch.cuda.max_memory_allocated())
        result.end_bytes = int(torch.cuda.memory_allocated())
        result.reserved_bytes = int(torch.cuda.memory_reserved())
        result.peak_reserved_bytes = int(torch.cuda.max_memory_reserved())
        free, total = torch.cuda.mem_get_info()
        result.device_used_bytes = int(total - free)
        result.untracked_bytes = max(result.peak_bytes - tracked_peak, 0)


def live_bytes(*objs: Any) -> int:
    """Bytes of the distinct storages behind ``objs`` right now (after a garbage collection)."""
    from .storages import storage_bytes

    gc.collect()
    return storage_bytes(list(objs))
