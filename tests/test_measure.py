"""The tracker against exact analytic byte counts."""

import gc

import pytest
import torch
from torch import nn

import vramlab
from vramlab import MiB, measure, storage_bytes
from vramlab.device import NoGPUError


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_params_grads_and_adam_state_to_the_byte():
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(32, 64)
    with measure(model, opt, x) as m:
        model(x).square().mean().backward()
        opt.step()
    P = param_bytes(model)
    assert m.source == "cpu-tracked"
    assert m.baseline_bytes == P + x.numel() * 4
    end = m.end_breakdown
    assert end["parameters"] == P
    assert end["gradients"] == P
    # Adam: exp_avg + exp_avg_sq per parameter, plus one fp32 step counter per tensor
    assert end["optimizer"] == 2 * P + 4 * len(list(model.parameters()))
    assert m.peak_bytes >= m.end_bytes >= P


def test_activation_bytes_of_a_linear_layer():
    layer = nn.Linear(100, 50, bias=False)
    x = torch.randn(8, 100, requires_grad=False)
    with measure(layer, x) as m:
        y = layer(x)
    assert m.peak_delta_bytes == 8 * 50 * 4  # only the output is new
    assert m.end_bytes - m.baseline_bytes == 8 * 50 * 4
    del y


def test_views_and_shared_storage_count_once():
    base = torch.zeros(1000)
    assert storage_bytes([base, base[10:20], base.view(10, 100)]) == 4000
    with measure() as m:
        t = torch.zeros(256)
        v = t[:10]  # a view allocates nothing
        w = v.clone()  # a copy does
    assert m.peak_bytes == 256 * 4 + 10 * 4
    del t, v, w


def test_freed_tensors_leave_the_count():
    with measure() as m:
        a = torch.ones(1000)
        b = a * 2
        del a
        c = b + 1
        del b
    assert m.peak_bytes == 3 * 4000 - 4000  # a and b never live together with c
    assert m.end_bytes == 4000
    del c


def test_tensor_subclass_is_flattened_to_its_storages():
    from torch.testing._internal.two_tensor import TwoTensor

    a, b = torch.zeros(100), torch.zeros(100)
    t = TwoTensor(a, b)
    assert storage_bytes(t) == 800


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_storage_counts_indices_and_values():
    dense = torch.zeros(100, 100)
    dense[0, :10] = 1.0
    coo = dense.to_sparse()
    csr = dense.to_sparse_csr()
    assert storage_bytes(coo) == 2 * 10 * 8 + 10 * 4  # int64 indices (2 x nnz) + fp32 values
    # the view trap: col_indices is a view into the 2 x nnz COO index storage it came from
    assert storage_bytes(csr) == 101 * 8 + 2 * 10 * 8 + 10 * 4
    compact = torch.sparse_csr_tensor(
        csr.crow_indices().clone(), csr.col_indices().clone(), csr.values().clone(), csr.shape, check_invariants=True
    )
    assert storage_bytes(compact) == 101 * 8 + 10 * 8 + 10 * 4  # crow (rows+1), col, values


def test_timeline_phases_and_peak():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 64)
    with measure(model, opt, x, timeline=True) as m:
        model(x).sum().backward()
        opt.step()
    phases = {p.phase for p in m.timeline}
    assert {"forward", "backward", "optimizer"} <= phases
    assert max(p.live_bytes for p in m.timeline) == m.peak_bytes
    assert sum(m.breakdown.values()) == m.peak_bytes


def test_frozen_parameters_get_no_gradient():
    model = small_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    with measure(model) as m:
        model(torch.randn(4, 64)).sum().backward()
    trainable = sum(p.numel() * 4 for p in model[2].parameters())
    assert m.end_breakdown["gradients"] == trainable


def test_live_bytes_helper():
    model = small_model()
    assert vramlab.live_bytes(model) == param_bytes(model)


def test_cuda_requested_without_gpu_says_what_to_do():
    if vramlab.has_cuda():
        pytest.skip("this machine has a GPU")
    with pytest.raises(NoGPUError, match="needs a CUDA GPU"):
        measure(device="cuda")


def test_bad_device():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        measure(device="tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_measurement_matches_allocator():
    """On CUDA the primary numbers are the tracker's, as on a CPU; the allocator's come beside them."""
    model = small_model().cuda()
    x = torch.randn(32, 64, device="cuda")
    junk = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # alive, not given: not counted
    with measure(model, x) as m:
        model(x).sum().backward()
    assert m.source == "cuda" and m.device == "cuda"
    assert m.baseline_bytes == param_bytes(model) + x.numel() * 4  # what it was given, as on a CPU
    assert m.end_breakdown["gradients"] == param_bytes(model)
    assert m.allocated_baseline_bytes >= junk.numel() + m.baseline_bytes  # process-wide
    assert m.allocated_peak_bytes >= m.allocated_baseline_bytes + m.peak_delta_bytes
    assert m.requested_peak_bytes - m.requested_baseline_bytes >= m.peak_delta_bytes
    assert m.reserved_bytes >= m.allocated_end_bytes and m.device_used_bytes > m.reserved_bytes
    assert m.allocated_now() == torch.cuda.memory_allocated()
    assert "allocator (process-wide)" in str(m)
    del junk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_budget_and_allocator_cap():
    """The tracked budget's edge is exact on CUDA too; allocator_cap raises CUDA's own message."""
    model = small_model().cuda()
    x = torch.randn(32, 64, device="cuda")
    with measure(model, x) as m:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    with vramlab.budget(m.peak_bytes, model, x):
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(torch.OutOfMemoryError), vramlab.budget(m.peak_bytes - 1, model, x):
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(torch.OutOfMemoryError, match="allowed"):
        with vramlab.budget(torch.cuda.memory_reserved() + 2**20, model, x, allocator_cap=True):
            torch.empty(2**30, dtype=torch.uint8, device="cuda")


def test_budget_and_measure_leave_no_hooks_behind():
    gc.collect()
    import torch.optim.optimizer as oo

    before = len(oo._global_optimizer_pre_hooks)
    with measure():
        torch.zeros(1)
    assert len(oo._global_optimizer_pre_hooks) == before


def test_tracked_tensors_can_die_inside_the_block():
    a = torch.zeros(1000)
    with measure(a) as m:
        del a  # measure must not keep its own reference
        b = torch.zeros(1000)
    assert m.peak_bytes == 4000
    del b


# -- faults found by fault injection (issue 11): each failed before the fix ---------------
def _post_grad_hooks(model):
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


def test_blocks_leave_no_gradient_hooks_on_parameters():
    model = small_model()
    for _ in range(20):
        with measure(model):
            model(torch.randn(4, 64)).sum().backward()
    with vramlab.budget("1 GiB", model):
        pass
    vramlab.largest_batch(lambda b: _step_in_budget(model, b), limit=8)
    assert _post_grad_hooks(model) == 0


def _step_in_budget(model, batch):
    with vramlab.budget("1 MiB", model):
        model(torch.randn(batch, 64)).sum().backward()


def test_a_slice_of_an_untracked_tensor_is_not_an_allocation():
    dataset = torch.zeros(8 * 2**20)  # 32 MiB made before the block, not passed to measure
    with measure() as m:
        head = dataset[:10]
        copy = (head + 1).clone()
    assert m.peak_bytes == 2 * copy.nbytes == 80 and m.breakdown["activations"] == 80
    with vramlab.budget("1 KiB"):
        dataset[:10].sum()


def test_a_pre_existing_storage_written_in_place_is_adopted_not_allocated():
    """DDP's gradient buckets exist before the block and are written in backward: memory the
    step uses, counted in the baseline (role other), never as a request the budget refuses."""
    bucket = torch.zeros(2**20)  # 4 MiB, not passed to measure
    with measure() as m:
        bucket[:10].add_(1)
        extra = torch.ones(10)
    assert (m.baseline_bytes, m.peak_delta_bytes) == (4 * MiB, 40)
    assert m.breakdown == {**dict.fromkeys(m.breakdown, 0), "other": 4 * MiB, "activations": 40}
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 40 B.*4.00 MiB is allocated"):
        with vramlab.budget("1 MiB"):
            bucket.mul_(2)  # adopted: the device now holds 4 MiB against a 1 MiB budget...
            torch.ones(10)  # ...so the next request is refused
    del extra


def test_from_numpy_batches_are_not_counted_as_activations():
    import numpy as np

    model = small_model()
    data = torch.from_numpy(np.zeros((4096, 64), dtype=np.float32))  # 1 MiB dataset
    with measure(model) as m:
        model(data[:4]).sum().backward()
    assert m.breakdown["activations"] < 16 * 1024


def test_generators_are_consumed_and_nothing_is_refused():
    model = small_model()
    with measure(model.parameters()) as m:
        pass
    assert m.baseline_bytes == param_bytes(model) == storage_bytes(model.parameters())
    assert m.breakdown["parameters"] == param_bytes(model)
    for bad in (None, 3, "model", [], {"a": None}):
        with pytest.raises(TypeError, match="holds no tensor, module or optimizer"):
            measure(bad)


def test_a_measure_object_entered_twice_reports_each_block():
    meter = measure()
    with meter as first:
        big = torch.zeros(1000)
    del big
    with meter as second:
        small = torch.zeros(10)
    assert (first.peak_bytes, second.peak_bytes) == (4000, 40) and first is not second
    with pytest.raises(RuntimeError, match="already measuring"):
        with meter:
            with meter:
                pass
    del small


def test_meta_and_other_devices_say_what_to_do():
    with pytest.raises(ValueError, match="meta tensors have shapes but no memory.*dryrun"):
        measure(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="got device 'meta'"):
        measure(device="meta")


def test_with_cuda_reported_cpu_tensors_are_still_measured_on_the_cpu(monkeypatch):
    """On a GPU machine, CPU tensors (and a block with nothing tracked) are measured by the CPU
    tracker: the device comes from the tensors, else torch's default device, never from has_cuda."""
    import sys

    for module in ("vramlab.measure", "vramlab.device"):
        monkeypatch.setattr(sys.modules[module], "has_cuda", lambda: True)
    x = torch.zeros(10)
    assert measure(x).device == "cpu" and measure().device == "cpu"
    assert vramlab.budget("1 MiB", x).device == "cpu" and vramlab.budget("1 MiB").device == "cpu"
    with vramlab.budget("1 KiB") as m:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(10**11)  # refused by the CPU budget, never handed to any allocator
    assert m.source == "cpu-tracked"


def test_autocast_dtype_follows_native_bf16(monkeypatch):
    import sys

    D = sys.modules["vramlab.device"]
    assert D.autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(D, "has_cuda", lambda: True)
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert D.autocast_dtype("cuda") == dtype, capability
    monkeypatch.setattr(D, "has_cuda", lambda: False)
    with pytest.raises(NoGPUError, match="autocast dtype"):
        D.autocast_dtype("cuda")


def test_gpu_processes_counts_process_lines_only():
    """torch's listing says 'no processes are running' when there are none: that is no process."""
    from vramlab.device import gpu_processes

    assert gpu_processes("GPU:0\nno processes are running") == []
    assert gpu_processes("GPU:0\nprocess      12345 uses     1024.000 MB GPU memory") == [
        "process      12345 uses     1024.000 MB GPU memory"
    ]
    assert gpu_processes("pynvml module not found, please install pynvml") is None


def test_cuda_context_probe_refuses_without_a_gpu_and_reads_its_childs_line(monkeypatch):
    """The CUDA-context measurement runs a child process; here its plumbing, with the GPU faked."""
    import subprocess

    from vramlab import device

    monkeypatch.setattr(device, "has_cuda", lambda: False)
    with pytest.raises(device.NoGPUError, match="measuring the CUDA context needs a CUDA GPU"):
        device.cuda_context_bytes()
    monkeypatch.setattr(device, "has_cuda", lambda: True)
    seen = {}

    def fake_run(cmd, **kw):
        seen["loading"] = kw["env"]["CUDA_MODULE_LOADING"]
        return subprocess.CompletedProcess(cmd, 0, stdout='{"grew": 530579456, "reserved": 2097152}\n', stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert device.cuda_context_bytes(lazy=False) == 530579456 - 2097152 and seen["loading"] == "EAGER"
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ModuleNotFoundError: No module named 'pynvml'"),
    )
    with pytest.raises(RuntimeError, match="pip install nvidia-ml-py"):
        device.cuda_context_bytes()


def test_allocator_and_workspace_probes_refuse_without_a_gpu_and_pass_their_settings(monkeypatch):
    """The allocator-setting and cuBLAS-workspace measurements of chapters 04-05 run in child
    processes (CUDA reads its settings once); here their plumbing, with the GPU faked."""
    import subprocess

    from vramlab import device

    monkeypatch.setattr(device, "has_cuda", lambda: False)
    with pytest.raises(device.NoGPUError, match="probing the CUDA allocator needs a CUDA GPU"):
        device.allocator_probe([2**20])
    with pytest.raises(device.NoGPUError, match="measuring the cuBLAS workspace needs a CUDA GPU"):
        device.cublas_workspace_bytes()
    for bad in ([], [0], [-5], [1.5], [True]):
        with pytest.raises(ValueError, match="positive byte counts"):
            device.allocator_probe(bad)
    monkeypatch.setattr(device, "has_cuda", lambda: True)
    seen = {}

    def fake_run(cmd, **kw):
        env = kw["env"]
        seen.update(conf=env.get("PYTORCH_CUDA_ALLOC_CONF"), ws=env.get("CUBLAS_WORKSPACE_CONFIG"), argv=cmd[3:])
        workspace = '{"grew": 8650752, "output": 262144}'
        out = workspace if "@" in cmd[2] else '{"requested": 1, "allocated": 2, "reserved": 3}'
        return subprocess.CompletedProcess(cmd, 0, stdout="noise\n" + out + "\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    conf = "roundup_power2_divisions:4"
    assert device.allocator_probe([1100 * 2**20], conf) == {"requested": 1, "allocated": 2, "reserved": 3}
    assert seen["conf"] == conf and seen["argv"] == [str([1100 * 2**20])]
    assert device.cublas_workspace_bytes(":16:8") == 8650752 - 262144 and seen["ws"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # inherited from this process ...
    device.cublas_workspace_bytes()
    assert seen["ws"] is None  # ... and removed: the default is PyTorch's own workspace size
    failed = subprocess.CompletedProcess([], 1, "", "boom\nRuntimeError: x")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(RuntimeError, match="the allocator probe failed: RuntimeError: x"):
        device.allocator_probe([1])
