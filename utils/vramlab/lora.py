"""LoRA adapters for dry runs: the module PEFT puts around each adapted linear, written out.

Each adapted ``nn.Linear`` keeps its frozen weight and gains ``A`` (rank × in) and ``B``
(out × rank) in fp32, as PEFT keeps adapters by default; the input is cast to fp32 for the
adapter path, so autograd saves that fp32 copy for ``A``'s gradient. Only the adapters train.
"""

from __future__ import annotations

import torch
from torch import nn

from .estimate.qlora import LORA_TARGETS

TARGETS = tuple(f"{name}_proj" for name in LORA_TARGETS)  # the linears the LoRA formula counts, by module name


class LoRALinear(nn.Module):
    """``base(x) + B(A(x)) · scaling``, with ``A`` and ``B`` in fp32 and ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float = 2.0) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=torch.float32)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling
        return result + update.to(result.dtype)


def add_adapters(net: nn.Module, rank: int) -> int:
    """Freeze every parameter of ``net`` and wrap each targeted linear (Llama-style names:
    q/k/v/o, gate/up/down projections) with a rank-``rank`` adapter; return how many were
    wrapped. A model with none of those linears (GPT-2's fused Conv1D projections) is refused."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"the LoRA rank must be a whole number of 1 or more, got {rank!r}")
    for p in net.parameters():
        p.requires_grad_(False)
    targets = [
        (parent, name, child)
        for parent in net.modules()
        for name, child in parent.named_children()
        if name in TARGETS and isinstance(child, nn.Linear)
    ]
    if not targets:
        raise ValueError(
            f"no linear named {', '.join(TARGETS)} to adapt in this model (GPT-2 fuses its projections "
            "into Conv1D layers): LoRA dry runs cover Llama-style blocks"
        )
    for parent, name, child in targets:
        setattr(parent, name, LoRALinear(child, rank))
    return len(targets)
