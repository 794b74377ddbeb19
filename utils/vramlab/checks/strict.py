"""Strict mode: the rules of the process a lab check runs the learner's code in.

A check measures the learner's code with a dispatch mode (:class:`~vramlab.tracker.StorageTracker`,
:func:`~vramlab.budget`) in the thread that runs it. In the learner's own notebook process that
measuring could be switched off from the learner's code: :func:`vramlab.tracker.on_host`, torch's
``_disable_current_modes``, or work handed to another thread or process. The sandbox process that
:mod:`vramlab.checks.isolation` starts for a check calls :func:`install` before it loads the
learner's code, and then:

- :func:`vramlab.tracker.on_host` no longer hides anything from a tracker (entering it is noted);
- popping a check's dispatch mode, ``_disable_current_modes``, ``_DisableTorchDispatch`` or
  excluding the Python dispatch key from code outside torch and vramlab is noted;
- starting a thread or a process (``threading``, ``_thread``, ``os.fork``, ``exec``, ``spawn``,
  ``subprocess``, ``multiprocessing``) raises :class:`Tampered`, and is noted;
- a saved-tensor pack hook that turns activations into Python bytes is noted, and so is a file
  opened during a judged forward pass (:class:`no_files`);
- around each call of the learner's code, :class:`Watch` asks the operating system whether
  another thread used CPU time or a child process existed (on Linux: ``RUSAGE_THREAD`` against
  ``RUSAGE_SELF``, ``RUSAGE_CHILDREN``, ``waitpid``), which also catches threads started through
  ``ctypes``.

What was noted is :data:`NOTES`; a check reports any note as tampering, whatever the learner's code
did with the exception. A learner who edits this module's state from inside the sandbox can still
defeat it: strict mode closes the ways a learner meets by accident or with a public API, not a
determined attack on the process that runs their own code.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._python_dispatch as python_dispatch

NOTES: list[str] = []
"""What the learner's code did to the measuring, in words (cleared by :class:`Watch`)."""

_OWNED: list[Any] = []
_TRUSTED = ("torch", "vramlab", "contextlib", "functools", "transformers", "torchao", "bitsandbytes")


class Tampered(BaseException):
    """The learner's code tried to start a thread or process in a check's process (a
    ``BaseException``, so an ``except Exception`` in the learner's code does not hide it)."""


def own(mode: Any) -> Any:
    """Mark a check's dispatch mode (a tracker or budget) as one the learner may not pop."""
    _OWNED.append(mode)
    return mode


def disown(mode: Any) -> None:
    """Forget a mode that the check is about to exit itself."""
    if any(m is mode for m in _OWNED):
        _OWNED[:] = [m for m in _OWNED if m is not mode]


def _from_learner(depth: int = 2) -> bool:
    """Whether the caller ``depth`` frames up is neither torch's nor vramlab's code."""
    frame = sys._getframe(depth)
    name = str(frame.f_globals.get("__name__", ""))
    return not name.startswith(_TRUSTED)


def _owned_on_stack() -> bool:
    stack = python_dispatch._get_current_dispatch_mode_stack()
    return any(m is o for m in stack for o in _OWNED)


def _note(what: str) -> None:
    if what not in NOTES:
        NOTES.append(what)


def _guard_pop(original: Callable[..., Any], what: str) -> Callable[..., Any]:
    def pop(*args: Any, **kwargs: Any) -> Any:
        if _owned_on_stack() and _from_learner():
            _note(what)
        return original(*args, **kwargs)

    return pop


def _refuse(what: str) -> Callable[..., Any]:
    def start(*args: Any, **kwargs: Any) -> Any:
        _note(what)
        raise Tampered(f"{what}: a lab check's process runs your code in one thread and no other process")

    return start


def _patch_dispatch() -> None:
    import torch.utils._python_dispatch as pd

    note = "switched off the check's dispatch mode (torch.utils._python_dispatch)"
    for name in ("_pop_mode", "_pop_torch_dispatch_stack", "_disable_current_modes", "_pop_mode_temporarily"):
        setattr(pd, name, _guard_pop(getattr(pd, name), note))
    C = torch._C
    for name in ("_pop_torch_dispatch_stack", "_DisableTorchDispatch", "_ExcludeDispatchKeyGuard"):
        setattr(C, name, _guard_pop(getattr(C, name), f"switched off the check's dispatch mode (torch._C.{name})"))


def _patch_host() -> None:
    from .. import tracker

    original = tracker.on_host

    def on_host() -> Any:
        _note("entered vramlab.tracker.on_host(), which hides work from a tracker (not in a lab check)")
        return original()

    tracker.on_host = on_host  # type: ignore[assignment]
    tracker._on_host = lambda: False  # type: ignore[assignment]


def _patch_threads_and_processes() -> None:
    import _posixsubprocess
    import _thread

    for module, names in (
        (_thread, ("start_new_thread", "start_joinable_thread", "_start_new_thread")),
        (threading, ("_start_new_thread", "_start_joinable_thread")),
    ):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refuse(f"started a thread ({module.__name__}.{name})"))
    process = [n for n in dir(os) if n.startswith(("exec", "spawn", "posix_spawn", "fork"))]
    for name in (*process, "system", "popen"):
        if callable(getattr(os, name, None)):
            setattr(os, name, _refuse(f"started a process (os.{name})"))
    _posixsubprocess.fork_exec = _refuse("started a process (subprocess)")


def _own_trackers() -> None:
    from ..tracker import StorageTracker

    enter, leave = StorageTracker.__enter__, StorageTracker.__exit__

    def __enter__(self: StorageTracker) -> StorageTracker:
        own(self)
        return enter(self)

    def __exit__(self: StorageTracker, *exc: Any) -> None:
        disown(self)
        leave(self, *exc)

    StorageTracker.__enter__ = __enter__  # type: ignore[method-assign]
    StorageTracker.__exit__ = __exit__  # type: ignore[method-assign]


_PACKED_LIMIT = 1024  # bytes of Python buffers a saved-tensor pack hook may return (a tensor is fine)


def _python_bytes(packed: Any) -> int:
    """Bytes of Python buffers and NumPy arrays in a pack hook's result (one level of containers)."""
    import numpy as np

    items = list(packed.values()) if isinstance(packed, dict) else packed
    items = items if isinstance(items, (list, tuple)) else [items]
    total = 0
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            total += memoryview(item).nbytes
        elif isinstance(item, np.ndarray):
            total += item.nbytes
    return total


def _watch_saved_tensor_hooks() -> None:
    """Note a pack hook that turns saved activations into Python bytes or NumPy arrays: on a CPU
    host that hides them from the budget rather than saving them (an offload to a real host
    is not what a CPU check can measure)."""
    from torch.autograd import graph

    init = graph.saved_tensors_hooks.__init__

    def __init__(self: Any, pack_hook: Callable[[torch.Tensor], Any], unpack_hook: Callable[[Any], Any]) -> None:
        def pack(tensor: torch.Tensor) -> Any:
            packed = pack_hook(tensor)
            if _python_bytes(packed) > _PACKED_LIMIT:
                _note("packed saved activations into Python bytes or NumPy arrays, which the budget cannot see")
            return packed

        init(self, pack, unpack_hook)

    graph.saved_tensors_hooks.__init__ = __init__  # type: ignore[method-assign]


class no_files:
    """While inside, opening a file or mapping one (``open``, ``os.open``, ``mmap``) is noted:
    a model's forward pass that reads its weights from disk holds them outside what is counted.
    Python's own source-line and package-metadata lookups (``linecache`` for warnings,
    ``importlib.metadata`` for version checks) are allowed."""

    def __enter__(self) -> no_files:
        import builtins
        import io
        import mmap

        self._saved = [(builtins, "open"), (io, "open"), (os, "open"), (mmap, "mmap")]
        self._saved = [(m, n, getattr(m, n)) for m, n in self._saved]
        for module, name, original in self._saved:
            setattr(module, name, self._guard(original, f"{module.__name__}.{name}"))
        return self

    @staticmethod
    def _guard(original: Callable[..., Any], what: str) -> Callable[..., Any]:
        def opened(*args: Any, **kwargs: Any) -> Any:
            caller = str(sys._getframe(1).f_globals.get("__name__", ""))
            if not caller.startswith(("linecache", "tokenize", "importlib")):  # source lines, package metadata
                _note(f"read a file during the model's forward pass ({what}): its bytes are the model's memory too")
            return original(*args, **kwargs)

        return opened

    def __exit__(self, *exc: object) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)


def install() -> None:
    """Put this process in strict mode (call once, before any learner code is loaded)."""
    torch.set_num_threads(1)
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # transformers loads weights on a thread pool otherwise
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # and tokenizers encodes batches on Rust threads
    _own_trackers()
    _watch_saved_tensor_hooks()
    _patch_dispatch()
    _patch_host()
    _patch_threads_and_processes()


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _children_alive() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)  # (0, 0) while a child runs; reaps one that ended
    except ChildProcessError:
        return False
    return True


class Watch:
    """Around one call of the learner's code: clear :data:`NOTES`, then add what the operating
    system saw (CPU time of other threads, child processes) when the call is over."""

    def __enter__(self) -> Watch:
        NOTES.clear()
        self._others = self._other_threads()
        self._children = _cpu(resource.RUSAGE_CHILDREN)
        self._had_children = _children_alive()  # none in a sandbox; a test process has its own
        return self

    @staticmethod
    def _other_threads() -> float:
        if not hasattr(resource, "RUSAGE_THREAD"):  # not Linux: the Python-level guards only
            return 0.0
        return _cpu(resource.RUSAGE_SELF) - _cpu(resource.RUSAGE_THREAD)

    def __exit__(self, *exc: object) -> None:
        if self._other_threads() - self._others > 0.05:
            _note("ran work on another thread (it used CPU time outside the check's thread)")
        if _cpu(resource.RUSAGE_CHILDREN) > self._children or (_children_alive() and not self._had_children):
            _note("started a process")
