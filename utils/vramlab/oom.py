"""Write and read out-of-memory messages, field by field.

CUDA's message (PyTorch 2.x) and the one :func:`vramlab.budget` raises on a CPU share their
fields: tried to allocate, total capacity, free, allocated by PyTorch, and reserved by
PyTorch but unallocated. :func:`format_oom_message` writes the budget's message in CUDA's
wording and order, :func:`parse_oom_message` reads either back in bytes (to the 2-decimal
precision the message prints), and :func:`advice` says what each field suggests doing.
"""

from __future__ import annotations

import re

from .units import format_bytes, parse_bytes

_SIZE = r"([0-9.]+ ?(?:[KMGT]iB|B))"
_FIELDS = {
    "tried": rf"Tried to allocate {_SIZE}",
    "total": rf"total capacity of {_SIZE}",
    "free": rf"of which {_SIZE} is free",
    "allocated": rf"{_SIZE} is allocated by PyTorch",
    "reserved_unallocated": rf"{_SIZE} is reserved by PyTorch but unallocated",
    "process_in_use": rf"this process has {_SIZE} memory in use",  # CUDA: PyTorch's plus the context and libraries
    "allowed": rf"{_SIZE} allowed;",  # CUDA, under set_per_process_memory_fraction: the cap
}


BUDGET_PREFIX = "vramlab budget: simulated"
NEXT_STEPS = "Free tensors you no longer need, lower the batch size, or apply a strategy from Part III."


def format_oom_message(tried: int, capacity: int, in_use: int, where: str = BUDGET_PREFIX) -> str:
    """The message :func:`vramlab.budget` raises, with the fields of CUDA's (all in bytes):
    ``tried`` the refused request, ``capacity`` the budget, ``in_use`` the live bytes."""
    free = max(capacity - in_use, 0)
    return (
        f"{where} out of memory. Tried to allocate {format_bytes(tried)}. "
        f"The budget has a total capacity of {format_bytes(capacity)} of which "
        f"{format_bytes(free)} is free. Of the allocated memory {format_bytes(in_use)} "
        "is allocated by PyTorch, and 0 B is reserved by PyTorch but unallocated "
        "(the CPU tracker has no cache, so there is no fragmentation). " + NEXT_STEPS
    )


def headline(message: str | BaseException) -> str:
    """An out-of-memory message without the advice :func:`vramlab.budget` appends: the fields
    only, for a one-line report. Messages from elsewhere come back whole."""
    return str(message).split(". " + NEXT_STEPS)[0]


def parse_oom_message(message: str) -> dict[str, int]:
    """The byte fields of an out-of-memory message (missing fields are left out)."""
    if not isinstance(message, str):
        message = str(message)
    found = {}
    for name, pattern in _FIELDS.items():
        match = re.search(pattern, message)
        if match:
            found[name] = parse_bytes(match.group(1).replace(" ", ""))
    if "tried" not in found:
        raise ValueError("this does not look like an out-of-memory message: no 'Tried to allocate' field")
    return found


def advice(fields: dict[str, int]) -> list[str]:
    """What the fields of an OOM message suggest, most telling first."""
    notes = []
    tried, allocated = fields.get("tried", 0), fields.get("allocated", 0)
    reserved_free = fields.get("reserved_unallocated", 0)
    if reserved_free >= tried:
        notes.append(
            f"{format_bytes(reserved_free)} is cached but unusable for a {format_bytes(tried)} request: "
            "fragmentation. Try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (chapter 05)."
        )
    if allocated and tried < 0.1 * allocated:
        notes.append(
            f"the failed request ({format_bytes(tried)}) is small next to what live tensors hold "
            f"({format_bytes(allocated)}): it is the last straw. Find what holds the memory (a breakdown by role, "
            "a leak across iterations) rather than the tensor that failed."
        )
    else:
        notes.append(
            f"one large request ({format_bytes(tried)}): a big activation or a batch too large for one step. "
            "Lower the batch, accumulate gradients, or checkpoint activations."
        )
    if "total" in fields and "free" in fields and allocated:
        other = fields["total"] - fields["free"] - allocated - reserved_free
        if other > 0:
            notes.append(
                f"{format_bytes(other)} of the device is used outside PyTorch's allocator "
                "(CUDA context, other processes)."
            )
    return notes
