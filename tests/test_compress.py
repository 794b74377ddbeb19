"""Quantization, pruning and MiniLM helpers: exact bytes, agreement with the libraries."""

import copy
import math
import sys
import warnings

import pytest
import torch
from torch import nn

import vramlab.estimate  # noqa: F401  (the module; `vramlab.estimate` the attribute is the function)
from vramlab import get_arch, minilm, storage_bytes
from vramlab import numformats as F
from vramlab import prune as P
from vramlab import quantize as Q

E = sys.modules["vramlab.estimate"]


@pytest.fixture(scope="module")
def mini():
    return minilm.load()


@pytest.fixture(scope="module")
def bnb():
    return Q.bitsandbytes()


# ------------------------------------------------------------------ number formats
def test_nf4_code_and_quantization_equal_bitsandbytes(bnb):
    import bitsandbytes.functional as BF

    assert torch.allclose(F.nf4_code(), BF.get_4bit_type("nf4", device="cpu"), atol=1e-6)
    x = torch.randn(300, 70) * 0.05
    packed, state = BF.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.allclose(F.nf4_quantize(x, 64).dequantize(), BF.dequantize_4bit(packed, state), atol=1e-6)


@pytest.mark.parametrize(
    "make, per_value",
    [
        (lambda x: F.absmax_quantize(x), 1 + 4 / 4096),
        (lambda x: F.absmax_quantize(x, block=64), 1 + 4 / 64),
        (lambda x: F.absmax_quantize(x, bits=4, block=64), 0.5 + 4 / 64),
        (lambda x: F.zeropoint_quantize(x), 1 + 5 / 4096),
        (lambda x: F.nf4_quantize(x, 64), 0.5 + 4 / 64 + 64 / 4096),
    ],
)
def test_measured_bytes_per_value(make, per_value):
    assert make(torch.randn(64, 64)).bytes_per_value == pytest.approx(per_value, abs=1e-12)


def test_pack_roundtrip_with_odd_sizes_and_padding():
    v = torch.randint(0, 16, (11,), dtype=torch.uint8)
    assert torch.equal(F.unpack_int4(F.pack_int4(v), 11), v)
    x = torch.randn(7, 3)  # 21 values, block 5: padded to 25
    for q in (F.absmax_quantize(x, 4, 5), F.nf4_quantize(x, 5), F.absmax_quantize(x, 8, 5)):
        assert q.dequantize().shape == x.shape
        assert F.relative_error(x, q) < 0.25


def test_error_halves_per_bit_and_blocks_contain_outliers():
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    errors = [F.relative_error(x, F.absmax_quantize(x, b)) for b in range(4, 9)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.7 < coarse / fine < 2.3
    x[0, 0] = 200.0
    assert F.relative_error(x, F.absmax_quantize(x, block=64)) < F.relative_error(x, F.absmax_quantize(x)) / 5


def test_zero_point_beats_absmax_on_positive_values():
    x = torch.rand(128, 128)
    assert F.relative_error(x, F.zeropoint_quantize(x)) < 0.6 * F.relative_error(x, F.absmax_quantize(x))


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda: F.absmax_quantize(torch.arange(4)), TypeError),
        (lambda: F.absmax_quantize([1.0, 2.0]), TypeError),
        (lambda: F.absmax_quantize(torch.randn(4), bits=9), ValueError),
        (lambda: F.absmax_quantize(torch.randn(4), block=0), ValueError),
        (lambda: F.nf4_quantize(torch.empty(0)), ValueError),
    ],
)
def test_number_formats_reject_bad_input(bad, error):
    with pytest.raises(error):
        bad()


# ------------------------------------------------------------------ storages of quantized layers
@pytest.mark.parametrize(
    "shape, double_quant", [((4096, 512), True), ((1000, 333), True), ((1000, 333), False), ((7, 9), False)]
)
def test_bnb_nf4_bytes_counted_and_equal_formula(bnb, shape, double_quant):
    p = bnb.nn.Params4bit(
        torch.randn(*shape), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=double_quant
    ).to("cpu")
    assert storage_bytes(p) == E.nf4_tensor_bytes(shape[0] * shape[1], double_quant=double_quant)
    assert storage_bytes(p) > p.untyped_storage().nbytes()  # the constants live beside the codes


def test_bnb_int8_counts_row_scales(bnb):
    model = Q.bnb_linears(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16)), 8)
    codes_and_bias = 64 * 32 + 32 * 16 + 4 * (32 + 16)
    assert storage_bytes(model) == codes_and_bias + 4 * (32 + 16)  # one fp32 scale per row
    model(torch.randn(2, 64))  # the first forward moves the scales into layer.state
    assert storage_bytes(model) == codes_and_bias + 4 * (32 + 16)


def test_torchao_int8_bytes_are_codes_plus_row_scales_and_zero_points():
    model = Q.torchao_int8(nn.Sequential(nn.Linear(64, 32, bias=False)))
    assert storage_bytes(model) == 64 * 32 + (4 + 1) * 32  # int8 codes, fp32 scale and int8 zero point per row


def test_bnb_linears_rejects_other_bit_widths():
    with pytest.raises(ValueError, match="8-bit or 4-bit"):
        Q.bnb_linears(nn.Linear(4, 4), 3)
    with pytest.raises(TypeError, match="nn.Module"):
        Q.torchao_int8("model")


# ------------------------------------------------------------------ QLoRA arithmetic
def test_lora_params_equal_real_adapters():
    arch = get_arch("llama-2-7b")
    rank = 8
    count = 0
    for out_f, in_f in E.linear_shapes(arch).values():
        a, b = nn.Linear(in_f, rank, bias=False, device="meta"), nn.Linear(rank, out_f, bias=False, device="meta")
        count += sum(p.numel() for p in [*a.parameters(), *b.parameters()])
    assert E.lora_param_count(arch, rank) == arch.num_layers * count
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        E.lora_param_count(arch, 8, ("qkv",))


def test_qlora_estimate_parts():
    est = E.qlora_estimate("llama-2-7b", rank=16, batch=1, seq=512)
    adapters = E.lora_param_count("llama-2-7b", 16)
    assert est.breakdown["gradients"] == 4 * adapters and est.breakdown["optimizer"] == 8 * adapters
    assert est.peak_bytes == sum(est.breakdown.values()) == max(est.moments.values())
    resident = est.moments["resident (weights, adapter state, saved activations)"]
    dequantized = 2 * 4096 * 11008  # one bf16 copy of the largest block linear
    block = E.block_backward_bytes("llama-2-7b", 1, 512, "bf16", checkpointing=True)
    assert est.peak_moment == "backward through one block" and est.peak_bytes == resident + block + dequantized
    assert est.breakdown["other"] == dequantized
    weights = est.breakdown["parameters"] - 4 * adapters
    assert 0.25 < weights / (2 * E.param_count("llama-2-7b")) < 0.32  # NF4 body, bf16 embedding and head
    with pytest.raises(ValueError):
        E.qlora_estimate("llama-2-7b", batch=-1)


# ------------------------------------------------------------------ MiniLM
def test_minilm_embeddings_equal_sentence_transformers(mini):
    st = pytest.importorskip("sentence_transformers")
    texts = minilm.sentences("tune")[:8]
    ours = minilm.embed(mini.model, mini.tokenizer, texts)
    theirs = st.SentenceTransformer(str(minilm.model_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs.cpu(), atol=1e-5)


def test_sentence_sets_are_disjoint_and_sized_and_the_held_out_set_is_not_public():
    from vramlab.checks import lab04

    tune, held = minilm.sentences("tune"), lab04._heldout()
    assert len(tune) == len(held) == 40 and not set(tune) & set(held)
    for name in ("test", "heldout"):
        with pytest.raises(ValueError, match="unknown sentence set"):
            minilm.sentences(name)


def test_embed_and_cosine_reject_bad_input(mini):
    with pytest.raises(ValueError, match="list of strings"):
        minilm.embed(mini.model, mini.tokenizer, "one sentence")
    with pytest.raises(ValueError, match="NaN"):
        minilm.mean_cosine(torch.full((2, 3), math.nan), torch.ones(2, 3))
    with pytest.raises(ValueError, match="shapes differ"):
        minilm.mean_cosine(torch.ones(2, 3), torch.ones(3, 3))


# ------------------------------------------------------------------ pruning
def test_structured_pruning_shrinks_tensors_by_the_predicted_bytes(mini):
    model = copy.deepcopy(mini.model)
    before = storage_bytes(model)
    P.prune_ffn_neurons(model, 0.25)
    removed = 1536 // 4
    assert storage_bytes(model) == before - 6 * 4 * removed * (384 + 384 + 1)
    P.prune_attention_heads(model, 0.5)
    assert model.encoder.layer[0].attention.self.query.weight.shape == (192, 384)
    out = minilm.embed(model, mini.tokenizer, ["a test sentence"])
    assert out.shape == (1, 384) and torch.isfinite(out).all()


def test_pruning_keeps_the_largest_units():
    lin = nn.Linear(4, 3)
    mask = P.magnitude_mask(torch.tensor([[0.1, -5.0], [2.0, 0.0]]), 0.5)
    assert mask.tolist() == [[False, True], [True, False]]
    with pytest.raises(ValueError, match="fraction"):
        P.prune_ffn_neurons(nn.Module(), 1.0)
    with pytest.raises(TypeError, match="BERT-style"):
        P.prune_ffn_neurons(lin, 0.5)


def test_csr_bytes_and_view_trap():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    w[torch.rand_like(w) < 0.8] = 0
    nnz = int((w != 0).sum())
    with warnings.catch_warnings():  # torch warns "beta" once per process: not this test's subject
        warnings.simplefilter("ignore")
        raw = w.to_sparse_csr()
    assert raw.col_indices().untyped_storage().nbytes() == 2 * 8 * nnz  # a row of the COO indices
    assert storage_bytes(P.to_csr(w)) == nnz * (4 + 8) + (96 + 1) * 8
    assert storage_bytes(P.to_csr(w, torch.int32)) == nnz * (4 + 4) + (96 + 1) * 4
    assert torch.equal(P.to_csr(w, torch.int32).to_dense(), w)


def test_module_bytes_counts_what_torch_prune_keeps():
    import torch.nn.utils.prune as tprune

    lin = nn.Linear(32, 16, bias=False)
    tprune.l1_unstructured(lin, "weight", 0.5)
    assert P.module_bytes(lin) == 3 * 32 * 16 * 4  # weight_orig, weight_mask, recomputed weight
    tprune.remove(lin, "weight")
    assert P.module_bytes(lin) == 32 * 16 * 4
    assert P.zero_fraction([lin.weight]) == 0.5


@pytest.mark.parametrize("bits", [8, 4])
def test_bnb_layers_are_quantized_by_the_move_to_the_models_device(bnb, monkeypatch, bits):
    """On a GPU the new layers' weights must start on the CPU (Int8Params quantizes only on a
    move from the CPU) and the model must go back to the device it was on before the swap."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    moved_to = []

    def device_of(m):  # a GPU model: its original weights are on CUDA, new bnb weights start on the CPU
        return torch.device("cuda" if type(next(m.parameters())) is nn.Parameter else "cpu")

    monkeypatch.setattr(Q, "_device", device_of)
    monkeypatch.setattr(model, "to", lambda device: moved_to.append(device) or model)
    Q.bnb_linears(model, bits)
    assert moved_to == [torch.device("cuda")]
    weight = model[0].weight
    assert weight.device.type == "cpu" and weight.dtype == torch.float32  # not quantized until moved
    weight = weight.to("cpu")  # the move quantizes (here to the CPU; on a GPU to CUDA)
    assert weight.dtype == (torch.int8 if bits == 8 else torch.uint8)


@pytest.mark.parametrize(("out_f", "in_f"), [(384, 384), (1536, 384), (384, 1536), (100, 1000), (4096, 11008)])
def test_int4_packed_bytes_follow_the_kernel_layout(out_f, in_f):
    """The formula against the shapes torch and torchao produce for the tinygemm layout: the
    packing op's meta kernel for the codes, torchao's own packing of scales and zeros."""
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    from vramlab.quantize import int4_packed_bytes

    rows, cols = -(-out_f // 8) * 8, -(-in_f // 1024) * 1024  # torchao pads before packing
    meta = torch.empty(rows, cols // 2, dtype=torch.uint8, device="meta")
    codes = torch.ops.aten._convert_weight_to_int4pack(meta, 8)
    scale = torch.ones(rows, cols // 32, dtype=torch.bfloat16)
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale, scale.clone(), torch.bfloat16)
    assert int4_packed_bytes(out_f, in_f, 32) == codes.numel() * 4 + scale_and_zero.numel() * 2
    assert int4_packed_bytes(384, 384, 32) == 245_760 > 384 * 384  # padding makes a small layer bigger than int8


def test_int4_packed_refuses_clearly_where_it_cannot_run(monkeypatch):
    from vramlab import quantize as Q

    with pytest.raises(RuntimeError, match="no GPU.*bitsandbytes NF4"):
        Q.torchao_int4_packed(nn.Sequential(nn.Linear(8, 8)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # a T4
    assert "8.0" in Q.int4_packed_unavailable() and "7.5" in Q.int4_packed_unavailable()
    with pytest.raises(ValueError, match="group sizes"):
        Q.int4_packed_bytes(8, 8, group=48)


def test_gptq_tensors_store_the_codes_in_gptqs_layout():
    """Unpacking qweight and qzeros gives back round-to-nearest (to fp16 scales), and the bytes
    are the format's plus g_idx's 4 per input column."""
    from vramlab import calibrated as C

    torch.manual_seed(0)
    w = torch.randn(64, 256)
    t = C.gptq_tensors(w)
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "qweight": (32, 64), "qzeros": (2, 8), "scales": (2, 64), "g_idx": (256,)
    }  # fmt: skip
    words = t["qweight"].to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(words >> (4 * j)) & 15 for j in range(8)], dim=1).reshape(256, 64).t()
    zwords = t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    zeros = torch.stack([(zwords >> (4 * j)) & 15 for j in range(8)], dim=-1).reshape(2, 64).t()
    back = (codes.float().reshape(64, 2, 128) - zeros.float().unsqueeze(-1)) * t["scales"].t().float().unsqueeze(-1)
    assert (back.reshape(64, 256) - C.rtn(w)).abs().max() < 2e-3  # fp16 scales
    assert sum(v.numel() * v.element_size() for v in t.values()) == C.group_bytes(64, 256) + 4 * 256
    with pytest.raises(ValueError, match="multiple of 8"):
        C.gptq_tensors(torch.randn(60, 256))
