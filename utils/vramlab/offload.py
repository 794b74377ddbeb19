"""An optimizer whose state and step live in the host's memory, as torchao's
``CPUOffloadOptimizer`` keeps them: the object the dry run traces for ``Setup.offload``.

torchao (``torchao.optim.CPUOffloadOptimizer``, defaults: AdamW, ``offload_gradients=False``,
``minimal_size=4096``) works like this, and so does :class:`OffloadedAdamW`:

- every trainable parameter of 4096 elements or more gets a host copy and a host gradient
  buffer of its own dtype, and its own fused AdamW on the host; smaller ones stay with a
  fused AdamW on the device;
- as soon as backward has accumulated a parameter's gradient, a hook copies it to the host
  buffer; the device gradient stays (torchao frees it only with ``offload_gradients=True``,
  which is not modelled);
- ``step()`` steps the device optimizer, then each host optimizer, and copies each updated
  host parameter back into the device parameter in place.

So the device keeps weights, gradients and activations, but no optimizer state beyond the
small parameters' and no optimizer temporary. The host holds 4 copies of each offloaded
parameter's bytes (parameter, gradient, two AdamW moments). Host work runs under
:func:`vramlab.tracker.on_host`, so a CPU emulation counts only what the device holds.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .setups import MINIMAL_SIZE
from .tracker import on_host


class OffloadedAdamW:
    """AdamW with its state and step on the host, parameters and gradients on the device
    (torchao ``CPUOffloadOptimizer`` defaults; see the module docstring). ``params`` are
    the device parameters; ``lr`` the learning rate."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-4) -> None:
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError("OffloadedAdamW got no trainable parameters")
        small = [p for p in trainable if p.numel() < MINIMAL_SIZE]
        self.device_optimizer = torch.optim.AdamW(small, lr=lr, fused=True) if small else None
        self._host: dict[torch.nn.Parameter, tuple[torch.Tensor, torch.optim.Optimizer]] = {}
        self._pending: dict[torch.Tensor, None] = {}  # parameters whose gradient reached the host
        for p in trainable:
            if p.numel() < MINIMAL_SIZE:
                continue
            with on_host(), torch.no_grad():
                host = torch.empty_like(p.detach())
                host.copy_(p.detach())
                host.grad = torch.empty_like(host)
                opt = torch.optim.AdamW([host], lr=lr, fused=True)
            self._host[p] = (host, opt)
            p.register_post_accumulate_grad_hook(self._copy_grad)

    def _copy_grad(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        host, _ = self._host[p]  # type: ignore[index]
        with on_host(), torch.no_grad():
            assert host.grad is not None
            host.grad.copy_(p.grad)
        self._pending[p] = None

    @torch.no_grad()
    def step(self) -> None:
        """Step the device parameters' optimizer, then each host optimizer, copying the
        updated host parameter back into the device parameter (no new device memory)."""
        if self.device_optimizer is not None:
            self.device_optimizer.step()
        for p in self._pending:
            host, opt = self._host[p]
            with on_host():
                opt.step()
            p.copy_(host)
        self._pending.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Free the device gradients (the host buffers are overwritten by the next copy)."""
        if not set_to_none:
            raise ValueError("OffloadedAdamW frees gradients (set_to_none=True), as torchao's does")
        for p in self._host:
            p.grad = None
        if self.device_optimizer is not None:
            self.device_optimizer.zero_grad(set_to_none=True)

    def host_bytes(self) -> int:
        """Bytes this optimizer holds in host memory now: parameter copies, gradient buffers
        and optimizer state."""
        total = 0
        for host, opt in self._host.values():
            assert host.grad is not None
            total += host.nbytes + host.grad.nbytes
            total += sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
        return total
