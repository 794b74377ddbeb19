"""Lab 4's checks: the shipped solution passes, the stub is 'not attempted', models that miss
the size or the quality bar (or predictions that are off) fail."""

from pathlib import Path

import pytest
import torch
from torch import nn

from notebook_code import defined_in
from vramlab import prune as P
from vramlab import quantize as Q
from vramlab.checks import CheckFailed, lab04
from vramlab.labs import make_lab
from vramlab.notebooks import load

SOLUTION = Path(__file__).resolve().parent.parent / "solutions" / "lab04_shrink_a_real_model.ipynb"
PRELUDE = (
    "import copy\nimport torch\nfrom torch import nn\nfrom vramlab import storage_bytes\n"
    "from vramlab import prune as P\nfrom vramlab import quantize as Q"
)


def answers(nb):
    scope = defined_in(nb, "def int8_bytes(", "lab04", PRELUDE)
    scope.update(defined_in(nb, "def shrink(", "lab04", PRELUDE))
    return scope["int8_bytes"], scope["shrink"]


def test_solution_passes_every_check():
    int8_bytes, shrink = answers(load(SOLUTION))
    assert lab04.check_int8_prediction(int8_bytes).passed
    assert lab04.check_size(shrink).passed
    assert lab04.check_quality(shrink).passed


def test_stub_is_not_attempted():
    int8_bytes, shrink = answers(make_lab(load(SOLUTION)))
    for check, fn in (
        (lab04.check_int8_prediction, int8_bytes),
        (lab04.check_size, shrink),
        (lab04.check_quality, shrink),
    ):
        assert check(fn).status == "not attempted yet"


def codes_only(model):  # forgets the per-row scale and zero point
    return sum(
        p.numel() * (1 if type(m) in (nn.Linear, nn.Embedding) and n == "weight" else p.element_size())
        for m in model.modules()
        for n, p in m.named_parameters(recurse=False)
    )


def linears_only(model):  # forgets that torchao quantizes the embedding tables too
    total = 0
    for m in model.modules():
        for n, p in m.named_parameters(recurse=False):
            total += (
                p.numel() + 5 * p.shape[0] if type(m) is nn.Linear and n == "weight" else p.numel() * p.element_size()
            )
    return total


def tuned_to_the_full_model(model):  # right for the full encoder only: fails on the pruned one
    return lab04.measured_int8_bytes(lab04.fresh_model())


@pytest.mark.parametrize("wrong", [codes_only, linears_only, tuned_to_the_full_model, lambda m: float("nan")])
def test_wrong_predictions_fail(wrong):
    with pytest.raises(CheckFailed):
        lab04.check_int8_prediction(wrong)


def int8_everywhere(model):
    return Q.torchao_int8(model, filter_fn=Q.linears_and_embeddings)


def nf4_everywhere(model):
    return Q.torchao_int8(Q.bnb_linears(model, 4), filter_fn=Q.linears_and_embeddings)


def prune_hard(model):
    return int8_everywhere(P.prune_ffn_neurons(model, 0.6))


def zeroed(model):  # small enough once quantized, but its output is constant garbage
    for lin in (m for m in model.modules() if type(m) is nn.Linear):
        torch.nn.init.zeros_(lin.weight)
    return nf4_everywhere(model)


def nan_model(model):
    model = nf4_everywhere(model)
    model.encoder.layer[0].output.LayerNorm.weight.data.fill_(float("nan"))
    return model


def test_too_big_fails_size_but_passes_quality():
    with pytest.raises(CheckFailed, match="measured 22"):
        lab04.check_size(int8_everywhere)
    assert lab04.check_quality(int8_everywhere).passed
    with pytest.raises(CheckFailed, match="against 20.00 MiB"):
        lab04.check_size(lambda m: m)  # the fp32 model itself


@pytest.mark.parametrize("lossy", [nf4_everywhere, prune_hard, zeroed, nan_model])
def test_small_but_lossy_fails_quality_and_passes_size(lossy):
    assert lab04.check_size(lossy).passed
    with pytest.raises(CheckFailed, match="held-out mean cosine"):
        lab04.check_quality(lossy)


def test_returning_something_else_fails_clearly():
    with pytest.raises(CheckFailed, match="must return the compressed encoder"):
        lab04.check_size(lambda m: None)


def test_int8_prediction_helper_matches_measurement():
    model = lab04.fresh_model()
    assert lab04.measured_int8_bytes(model) < P.module_bytes(model) / 3


def test_a_prediction_that_quantizes_and_measures_is_refused():
    with pytest.raises(CheckFailed, match="your prediction allocated tensors.*do not quantize"):
        lab04.check_int8_prediction(lab04.measured_int8_bytes)


class _Unregistered(nn.Module):
    """Keeps the fp32 encoder as a plain attribute: no registered parameter, 0 B to module_bytes."""

    def __init__(self, encoder):
        super().__init__()
        object.__setattr__(self, "encoder", encoder)

    def forward(self, **batch):
        return self.encoder(**batch)


_GLOBAL_ENCODER = []


class _ReadsAGlobal(nn.Module):
    """Holds nothing; its forward runs an encoder kept in a module-level global."""

    def forward(self, **batch):
        return _GLOBAL_ENCODER[0](**batch)


def unregistered(model):
    return _Unregistered(model)


def reads_a_global(model):
    _GLOBAL_ENCODER[:] = [model]
    return _ReadsAGlobal()


def fp32_in_a_hook(model):
    small = nf4_everywhere(lab04.fresh_model())
    kept = [p.detach().clone() for p in model.parameters()]  # an fp32 copy, alive through a closure
    small.register_forward_hook(lambda mod, inp, out: kept and out)
    return small


class _OpaqueLinear(nn.Module):
    """Review (labs) D15: an fp32 weight kept as an MKLDNN buffer, made dense in forward."""

    def __init__(self, linear):
        super().__init__()
        self.register_buffer("w", linear.weight.detach().to_mkldnn())
        self.register_buffer("b", linear.bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.w.to_dense(), self.b)


def opaque_linears(model):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _OpaqueLinear(child))
    return model


@pytest.mark.parametrize(
    "hiding, words",
    [
        (opaque_linears, "layout torch._mkldnn has no storage"),
        (unregistered, "measured 86"),
        (fp32_in_a_hook, "measured 1[0-9][0-9]"),
        (reads_a_global, "forward pass reads 86"),
    ],
)
def test_weights_hidden_outside_registered_parameters_are_counted(hiding, words):
    if hiding is not opaque_linears:  # module_bytes refuses an MKLDNN buffer (tests/test_reach.py)
        assert P.module_bytes(hiding(lab04.fresh_model())) < lab04.TARGET_BYTES
    with pytest.raises(CheckFailed, match=words):
        lab04.check_size(hiding)


def test_dynamic_quantization_packed_weights_are_counted():
    model = torch.ao.quantization.quantize_dynamic(lab04.fresh_model(), {nn.Linear}, dtype=torch.qint8)
    packed = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    want = sum(m.in_features * m.out_features + 4 * m.out_features for m in packed)  # int8 codes + fp32 bias
    held, hidden = lab04.measured_bytes(model)
    assert held - P.module_bytes(model) == want and hidden == 0


def test_one_model_is_judged_on_size_and_quality():
    """Review (labs) D2a: a shrink that returned a small model to one check and the fp32 one to the
    other passed both. Each check now calls shrink once, in a fresh sandbox that starts from the
    notebook's state, and judges size and quality the same way: a call counter cannot tell the
    checks apart."""
    calls = []

    def small_then_fp32(model):
        calls.append(1)
        return nf4_everywhere(model) if len(calls) % 2 else model

    lab04.check_size(small_then_fp32)  # NF4 everywhere: small enough ...
    with pytest.raises(CheckFailed, match="held-out mean cosine"):
        lab04.check_quality(small_then_fp32)  # ... and NF4 again here, where it is too lossy

    def fp32_then_small(model):
        calls.append(1)
        return model if len(calls) % 2 else nf4_everywhere(model)

    lab04.check_quality(fp32_then_small)  # the fp32 model: cosine 1 ...
    with pytest.raises(CheckFailed, match="measured 86"):
        lab04.check_size(fp32_then_small)  # ... and the fp32 model again: too big
    assert calls == []  # every call happened in a sandbox, on its own copy of `calls`


def test_a_model_that_uses_a_hidden_encoder_for_quality_only_fails():
    """Review (labs) D13: a model that runs a global fp32 encoder except on the size check's probe."""
    fp32 = lab04.fresh_model()

    class Switch(nn.Module):
        def __init__(self, small):
            super().__init__()
            self.small = small

        def forward(self, **batch):
            return (self.small if len(batch["input_ids"]) == 4 else fp32)(**batch)

    def switch(model):
        return Switch(nf4_everywhere(model))

    with pytest.raises(CheckFailed, match="forward pass reads 86"):
        lab04.check_quality(switch)
