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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .device import has_cuda
from .storages import tensors_in
from .tracker import ROLES, StorageTracker, TimelinePoint
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


def _infer_device(track: tuple[Any, ...]) -> str:
    for tensor in tensors_in(list(track)):
        return tensor.device.type
    return "cuda" if has_cuda() and not _fake_mode_active() else "cpu"


class measure:
    """Context manager: measure peak and current memory of the code inside it.

    Args:
        *track: objects alive before the block whose bytes count (modules, optimizers,
            tensors); a module's parameters and future gradients get their roles.
        device: "cpu" or "cuda"; default: where the tracked objects live, else CUDA if
            available, else CPU.
        timeline: record live bytes after every op (``Measurement.timeline``).
        round_to: round each storage up to this many bytes (512 mimics the CUDA allocator).

    On CUDA the device has one peak counter: a ``measure`` (or ``budget``) nested inside
    another resets it, so read the outer block's ``current_bytes()``, not its peak, there.
    """

    def __init__(
        self,
        *track: Any,
        device: str | None = None,
        timeline: bool = False,
        round_to: int = 1,
    ) -> None:
        self.device = device or _infer_device(track)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if self.device == "cuda" and not has_cuda():
            from .device import require_cuda

            require_cuda("measure(device='cuda')")
        self.track = track
        self.result = Measurement(source=self._source(), device=self.device)
        self.tracker = StorageTracker(self.device, timeline=timeline, round_to=round_to)

    def _source(self) -> str:
        if self.device == "cuda":
            return "cuda"
        return "dry-run" if _fake_mode_active() else "cpu-tracked"

    def __enter__(self) -> Measurement:
        tracker = self.tracker
        tracker.set_phase("before")
        for obj in self.track:
            tracker.register(obj)
        tracker.set_phase(None)
        # keep only what the final role pass needs: holding tracked tensors would keep them alive
        self.track = tuple(o for o in self.track if isinstance(o, (torch.nn.Module, torch.optim.Optimizer)))
        if tracker.limit is not None and tracker.current_bytes > tracker.limit:
            raise torch.OutOfMemoryError(
                f"vramlab budget: what is already alive ({format_bytes(tracker.current_bytes)}) "
                f"exceeds the budget of {format_bytes(tracker.limit)} before the block starts; "
                "free tensors first or use a larger budget."
            )
        self.result.baseline_bytes = tracker.current_bytes
        self.result._live = lambda: tracker.current_bytes
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.result.baseline_bytes = int(torch.cuda.memory_allocated())
            self.result._live = torch.cuda.memory_allocated
        tracker.__enter__()
        return self.result

    def __exit__(self, *exc: Any) -> None:
        tracker = self.tracker
        tracker.__exit__(*exc)
        for obj in self.track:  # final roles: gradients and states that now exist
            if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
                tracker.register(obj)
        result = self.result
        result.breakdown = tracker.peak_breakdown()
        result.end_breakdown = tracker.breakdown()
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
