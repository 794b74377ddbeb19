"""reach: every byte an object holds, and what a computation reads that it does not hold."""

import functools

import numpy as np
import pytest
import torch

from vramlab import reach


def test_views_and_shared_tensors_count_once():
    base = torch.zeros(256)
    held = reach.reachable({"a": base, "b": base[:10], "c": [base.view(16, 16)]})
    assert held.nbytes == 1024


def test_attributes_closures_partials_methods_and_arrays_are_followed():
    class Holder:
        __slots__ = ("slot",)

    hidden = torch.zeros(100)
    slot = Holder()
    slot.slot = torch.zeros(10)

    def make():
        inner = torch.zeros(50)
        return lambda: inner

    class Thing:
        def __init__(self):
            self.array = np.zeros(25, dtype=np.float32)
            self.view = self.array[:5]  # a view of the same array: counted once

        def method(self):
            return None

    thing = Thing()
    obj = [make(), functools.partial(print, hidden), thing.method, slot]
    assert reach.reachable(obj).nbytes == 400 + 200 + 100 + 40


def test_module_globals_are_not_followed_but_reads_of_them_are_seen():
    module = torch.nn.Linear(4, 4)
    outside = torch.ones(1000)

    def forward():
        return module(torch.ones(2, 4)) + outside[:4]

    assert reach.reachable(module).nbytes == (16 + 4) * 4
    hidden = reach.read_by(forward).minus(reach.reachable(module))
    assert hidden.nbytes == 4000


def test_a_parameter_keeps_its_side_tensors():
    p = torch.nn.Parameter(torch.zeros(8))
    p.SCB = torch.zeros(8)  # as bitsandbytes attaches row scales to an 8-bit weight
    assert reach.reachable(p).nbytes == 64


def test_too_many_objects_is_refused(monkeypatch):
    monkeypatch.setattr(reach, "MAX_OBJECTS", 100)
    with pytest.raises(reach.UnmeasurableObject, match="more than 100 objects"):
        reach.reachable([[i] for i in range(200)])


def test_an_opaque_tensor_is_refused_not_counted_as_zero():
    """Review (labs) D15: weights held as MKLDNN buffers (no readable storage) counted 0 B, so an
    fp32 MiniLM passed Lab 4's size check at 129.5 KiB. reach() now refuses them."""
    module = torch.nn.Module()
    module.register_buffer("w", torch.randn(64, 64).to_mkldnn())
    with pytest.raises(reach.UnmeasurableObject, match="layout torch._mkldnn .* .to_dense"):
        reach.reachable(module)
    from vramlab.prune import module_bytes
    from vramlab.storages import OpaqueTensor, storage_bytes

    for count in (storage_bytes, module_bytes):  # the plain counters refuse it too
        with pytest.raises(OpaqueTensor, match="to_dense"):
            count(module)
    module.w = module.w.to_dense()
    assert reach.reachable(module).nbytes == storage_bytes(module) == 64 * 64 * 4
