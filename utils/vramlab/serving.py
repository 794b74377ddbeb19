"""How many requests a vLLM server holds: its start-up memory plan, as vLLM computes it.

vLLM (V1 engine, ``vllm serve``) sizes its KV cache once, at start-up, in this order:

1. **Requested memory** = the GPU's *total* memory × ``gpu_memory_utilization`` (not the free
   memory): ``Worker.init_device`` in ``vllm/v1/worker/gpu_worker.py``.
2. **Non-KV memory** = the weights ("Model loading took X GiB") + the increase of torch's peak
   allocated bytes during ``profile_run`` + the non-torch memory that appeared since start-up
   (CUDA modules, cuBLAS handles): ``memory_profiling`` in ``vllm/utils/mem_utils.py``.
   ``profile_run`` is one forward of ``max_num_batched_tokens`` tokens split over
   ``min(max_num_seqs, max_num_batched_tokens)`` requests, with logits for the last token of
   each and a dummy run of the sampler over them; the KV cache does not exist yet.
3. **Available KV memory** = requested − non-KV (logged as "Available KV cache memory").
   From v0.21 vLLM also subtracts an estimate of its CUDA graphs
   (``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS``); before, graphs are captured after the cache
   is allocated and come out of the ``1 − utilization`` margin. Pass ``cuda_graph_bytes`` for
   the newer behaviour.
4. **Blocks** = available // page // layers, where a page holds ``block_size`` tokens of one
   layer: 2 (K and V) × block_size × KV heads on this rank × head_dim × bytes per element
   (``get_kv_cache_config`` in ``vllm/v1/core/kv_cache_utils.py``, ``AttentionSpec.page_size_bytes``
   in ``vllm/v1/kv_cache_interface.py``). KV heads on a rank are ``max(1, kv_heads // tp)``:
   with more GPUs than KV heads, vLLM replicates them.
5. "GPU KV cache size" = blocks × block_size tokens; "Maximum concurrency for L tokens per
   request" = blocks / ceil(L / block_size).

Sources read (commits in ``bench/vllm/cases.json``): vllm-project/vllm ``gpu_worker.py``,
``mem_utils.py``, ``kv_cache_utils.py``, ``kv_cache_interface.py``, ``gpu_model_runner.py``
and ``v1/sample/ops/topk_topp_sampler.py``.

What is modelled, and what is not: steps 1, 3, 4 and 5 are arithmetic and exact (the bench
reproduces every logged block count from the logged available memory). Step 2's weights are
the checkpoint's stored bytes per rank (or the parameters' bytes), and its profile peak is a
dry run of the same forward and of the sampler's PyTorch path on fake tensors: vLLM's fused
kernels and FlashInfer's sampler allocate differently, so this term is an estimate, measured
against vLLM's logs in ``bench/vllm/``. The non-torch term is not predictable from a config
(0.01-0.35 GiB in the logs); it defaults to :data:`NON_TORCH_BYTES`. Give the numbers your
own log prints (``profile_peak_bytes``, ``non_torch_bytes``, ``weights_bytes``) and the rest
is vLLM's arithmetic. Sliding-window, MLA, hybrid (Mamba) and MoE models, pipeline
parallelism and quantized KV scales are not modelled and are refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .estimate import kv_cache_bytes_classic, param_count
from .models import ArchConfig, get_arch
from .units import GiB, format_bytes

BLOCK_SIZE = 16
"""vLLM's default ``--block-size`` on CUDA: tokens per KV-cache block."""

NON_TORCH_BYTES = 128 * 2**20
"""The non-torch memory assumed when none is given (bytes). vLLM measures it at start-up;
its logs show 0.01 to 0.35 GiB (``bench/vllm/cases.json``)."""

KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
MODEL_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4}
LARGE_GPU = 70 * GiB
SLIDING_WINDOWS = {"mistral-7b": 4096}
"""Registry models whose attention is a sliding window (tokens): vLLM sizes their requests by the
window, which is not modelled here, so they are refused."""


@dataclass(frozen=True)
class ServeConfig:
    """The flags of ``vllm serve`` that size its memory, for one GPU of ``gpu_bytes`` (bytes,
    the total ``torch.cuda.mem_get_info()`` reports).

    ``max_num_seqs`` and ``max_num_batched_tokens`` default as ``vllm serve`` does (v0.9 and
    later): 1024 and 8192 on a GPU of 70 GiB or more that is not an A100, otherwise 256 and
    2048. ``gpu_name`` decides "not an A100"; with a bare size of 70 GiB or more both must be
    given. ``max_model_len`` defaults to the model's context. ``profile_peak_bytes``,
    ``non_torch_bytes`` and ``weights_bytes`` replace the estimates by what your vLLM log says
    ("torch peak memory increase", "non-torch forward increase memory", "Model loading took").
    """

    gpu_bytes: int
    tp: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = BLOCK_SIZE
    dtype: str = "bf16"
    gpu_name: str = ""
    sampler: str = "flashinfer"
    profile_peak_bytes: int | None = None
    non_torch_bytes: int | None = None
    weights_bytes: int | None = None
    cuda_graph_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("gpu_bytes", "tp", "block_size"):
            _positive(name, getattr(self, name))
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("profile_peak_bytes", "non_torch_bytes", "weights_bytes", "cuda_graph_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a whole number of bytes >= 0, got {value!r}")
        util = self.gpu_memory_utilization
        if not isinstance(util, (int, float)) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r} (vLLM's default is 0.9)")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r}: use auto or one of {sorted(KV_DTYPE_BYTES)}")
        if self.dtype not in MODEL_DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r}: use one of {sorted(MODEL_DTYPE_BYTES)}")
        if self.sampler not in ("native", "flashinfer"):
            raise ValueError(f"sampler {self.sampler!r}: use native (PyTorch top-k/top-p) or flashinfer")

    def batching(self) -> tuple[int, int]:
        """``(max_num_seqs, max_num_batched_tokens)``, with vLLM's defaults for this GPU."""
        seqs, tokens = self.max_num_seqs, self.max_num_batched_tokens
        if seqs is None or tokens is None:
            if self.gpu_bytes >= LARGE_GPU and not self.gpu_name:
                raise ValueError(
                    "vLLM's default max_num_seqs and max_num_batched_tokens on a GPU of 70 GiB or more depend on "
                    "whether it is an A100 (256 and 2048) or not (1024 and 8192): name the GPU (--gpu H100) "
                    "or give --max-num-seqs and --max-num-batched-tokens"
                )
            large = self.gpu_bytes >= LARGE_GPU and "a100" not in self.gpu_name.lower()
            seqs = seqs if seqs is not None else (1024 if large else 256)
            tokens = tokens if tokens is not None else (8192 if large else 2048)
        if tokens < seqs:
            raise ValueError(
                f"max_num_batched_tokens ({tokens}) must be at least max_num_seqs ({seqs}), as vLLM requires"
            )
        return seqs, tokens


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")


def kv_heads_per_rank(arch: ArchConfig, tp: int) -> int:
    """KV heads each of ``tp`` ranks stores: vLLM splits them, or replicates them when ``tp``
    exceeds their number. Refuses a ``tp`` vLLM refuses."""
    if arch.num_heads % tp:
        raise ValueError(f"{arch.name}: tensor parallel size {tp} does not divide its {arch.num_heads} attention heads")
    kv = arch.num_kv_heads
    if kv % tp and tp % kv:
        raise ValueError(
            f"{arch.name}: tensor parallel size {tp} neither divides nor is a multiple of its {kv} KV heads"
        )
    return max(1, kv // tp)


def kv_bytes_per_token(arch: ArchConfig, tp: int = 1, kv_cache_dtype: str = "auto", dtype: str = "bf16") -> int:
    """Bytes of KV cache one token takes on one rank, over all layers: 2 (K and V) × KV heads
    on the rank × head_dim × bytes per element × layers."""
    element = KV_DTYPE_BYTES.get(kv_cache_dtype) or MODEL_DTYPE_BYTES[dtype]
    return kv_cache_bytes_classic(arch.num_layers, kv_heads_per_rank(arch, tp), arch.head_dim, 1, 1, element)


def weights_per_rank(arch: ArchConfig, tp: int = 1, dtype: str = "bf16") -> int:
    """Bytes of weights on one of ``tp`` ranks, as vLLM lays them out: attention and MLP
    projections split ``tp`` ways (KV projections replicated past their head count), the
    vocabulary padded to a multiple of 64 and split, norms whole."""
    padded_vocab = -(-arch.vocab_size // 64) * 64
    if arch.family == "gpt2":  # learned positions and biases everywhere: counted whole, one GPU only
        if tp > 1:
            raise ValueError(f"{arch.name}: tensor parallelism of GPT-2-style models is not modelled; use --tp 1")
        return (param_count(arch) + (padded_vocab - arch.vocab_size) * arch.hidden_size) * MODEL_DTYPE_BYTES[dtype]
    h, kv_dim = arch.hidden_size, kv_heads_per_rank(arch, tp) * arch.head_dim
    per_layer = h * h // tp * 2 + h * kv_dim * 2 + (3 if arch.gated_mlp else 2) * h * arch.intermediate_size // tp
    if arch.qkv_bias:
        per_layer += h // tp + 2 * kv_dim
    per_layer += 2 * h  # the two norms
    embeddings = -(-padded_vocab // tp) * h * (1 if arch.tie_embeddings else 2)
    return (per_layer * arch.num_layers + embeddings + h) * MODEL_DTYPE_BYTES[dtype]


def profile_peak_bytes(
    arch: ArchConfig, tokens: int, requests: int, sampler: str = "flashinfer", dtype: str = "bf16"
) -> int:
    """The increase of torch's peak during vLLM's ``profile_run`` (bytes), by dry run on fake
    tensors on one rank (tp = 1): the model's forward over ``tokens`` tokens without a KV
    cache, the logits of ``requests`` last tokens, then the sampler's dummy run on them.

    The sampler: vLLM casts the logits to float32; its PyTorch path (``native``) sorts them
    (float32 values, int64 indices), takes a softmax and its cumulative sum for top-p,
    scatters the kept logits back and draws from a float32 softmax; FlashInfer's kernel
    (``flashinfer``) needs only the float32 logits and their probabilities."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .dryrun import _quiet_fake_tensor_log, build_hf_model
    from .measure import measure

    torch_dtype = {2: torch.bfloat16, 4: torch.float32}[MODEL_DTYPE_BYTES[dtype]]
    with FakeTensorMode(), _quiet_fake_tensor_log():
        net = build_hf_model(arch, torch_dtype).eval()
        ids = torch.randint(0, arch.vocab_size, (1, tokens))
        with measure(net, ids) as m, torch.inference_mode():
            logits = net(input_ids=ids, use_cache=False, logits_to_keep=requests).logits[0]
            _sampler(logits, sampler)
            del logits
    return m.peak_bytes - m.baseline_bytes


def _sampler(logits: Any, sampler: str) -> None:
    """The allocations of vLLM's sampler dummy run on ``logits`` ([requests, vocab])."""
    import torch

    logits = logits.to(torch.float32)
    if sampler == "native":
        values, index = logits.sort(dim=-1)
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)
        values = values.masked_fill(cumulative <= 0.01, -float("inf"))
        del cumulative
        logits = values.scatter(dim=-1, index=index, src=values)
        del values, index
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    noise = torch.empty_like(probs).exponential_()
    probs.div_(noise).argmax(dim=-1)


@dataclass
class ServePlan:
    """vLLM's start-up plan on one rank. Sizes in bytes; ``sources`` says where each non-KV
    term came from ("stored", "formula", "dry run", "assumed", "given")."""

    model: str
    config: ServeConfig
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    weights_bytes: int
    profile_peak_bytes: int
    non_torch_bytes: int
    requested_bytes: int
    available_kv_bytes: int
    kv_bytes_per_token: int
    page_bytes: int
    num_blocks: int
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def kv_cache_tokens(self) -> int:
        """vLLM's "GPU KV cache size: N tokens"."""
        return self.num_blocks * self.config.block_size

    def max_concurrency(self, length: int | None = None) -> float:
        """vLLM's "Maximum concurrency for L tokens per request": requests of ``length``
        tokens (default ``max_model_len``) the cache holds at once."""
        length = self.max_model_len if length is None else length
        _positive("length", length)
        return self.num_blocks / math.ceil(length / self.config.block_size)

    @property
    def largest_max_model_len(self) -> int:
        """The largest ``--max-model-len`` one request may have here (vLLM refuses to start
        when one request of ``max_model_len`` tokens does not fit the cache)."""
        return self.kv_cache_tokens

    @property
    def fits(self) -> bool:
        """Whether vLLM starts: the cache holds one request of ``max_model_len`` tokens."""
        return self.num_blocks >= math.ceil(self.max_model_len / self.config.block_size)

    def kv_cache_memory_for(self, requests: int, length: int | None = None) -> int:
        """The ``--kv-cache-memory`` (bytes) that holds ``requests`` requests of ``length``
        tokens (default ``max_model_len``): whole blocks of every layer."""
        _positive("requests", requests)
        length = self.max_model_len if length is None else length
        _positive("length", length)
        blocks = requests * math.ceil(length / self.config.block_size)
        return blocks * self.config.block_size * self.kv_bytes_per_token

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "config"}
        out["config"] = asdict(self.config)
        out.update(
            kv_cache_tokens=self.kv_cache_tokens,
            max_concurrency=round(self.max_concurrency(), 4),
            largest_max_model_len=self.largest_max_model_len,
            starts=self.fits,
        )
        return out

    def __str__(self) -> str:
        c = self.config
        terms = [
            (f"requested ({c.gpu_memory_utilization:g} x total)", self.requested_bytes, ""),
            ("weights", self.weights_bytes, self.sources["weights"]),
            ("profile-run peak increase", self.profile_peak_bytes, self.sources["profile"]),
            ("non-torch memory", self.non_torch_bytes, self.sources["non_torch"]),
        ]
        if c.cuda_graph_bytes:
            terms.append(("CUDA graphs (v0.21+)", c.cuda_graph_bytes, "given"))
        terms += [
            ("available KV cache memory", self.available_kv_bytes, ""),
            ("KV cache per token", self.kv_bytes_per_token, ""),
        ]
        head = f"vLLM start-up plan for {self.model} on {c.gpu_name or format_bytes(c.gpu_bytes)}"
        rows = [head + (f" x{c.tp} (tensor parallel), per GPU" if c.tp > 1 else "")]
        rows += [f"  {label:<28}{format_bytes(n):>11}" + (f"  ({note})" if note else "") for label, n, note in terms]
        rows += [
            f"  GPU KV cache size: {self.kv_cache_tokens:,} tokens ({self.num_blocks:,} blocks of {c.block_size})",
            f"  Maximum concurrency for {self.max_model_len:,} tokens per request: {self.max_concurrency():.2f}x",
        ]
        if not self.fits:
            rows.append(
                f"  vLLM would refuse to start: one {self.max_model_len:,}-token request needs more than the cache; "
                f"the largest --max-model-len here is {self.largest_max_model_len:,}"
            )
        return "\n".join(rows)


def serve_plan(model: str | ArchConfig, config: ServeConfig, *, name: str | None = None) -> ServePlan:
    """vLLM's start-up memory plan for ``model`` (a registry name or :class:`ArchConfig`) under
    ``config``; see the module docstring for the algorithm and what is estimated."""
    arch = get_arch(model)
    if arch.name in SLIDING_WINDOWS:
        raise ValueError(
            f"{arch.name} attends over a sliding window of {SLIDING_WINDOWS[arch.name]} tokens, which vLLM sizes "
            "differently per request; vramlab serve models full attention only"
        )
    seqs, tokens = config.batching()
    length = config.max_model_len or arch.max_position
    if length > arch.max_position:
        raise ValueError(
            f"max_model_len {length} exceeds {arch.name}'s context of {arch.max_position} tokens, which vLLM refuses"
        )
    per_token = kv_bytes_per_token(arch, config.tp, config.kv_cache_dtype, config.dtype)
    sources = {}
    weights = config.weights_bytes
    sources["weights"] = "given" if weights is not None else "formula"
    if weights is None:
        weights = weights_per_rank(arch, config.tp, config.dtype)
    profile = config.profile_peak_bytes
    sources["profile"] = "given" if profile is not None else f"dry run, {config.sampler} sampler"
    if profile is None:
        if config.tp > 1:
            raise ValueError(
                "the profile-run dry run covers one GPU; with --tp give --profile-peak from your vLLM log "
                "('torch peak memory increase')"
            )
        profile = profile_peak_bytes(arch, tokens, min(seqs, tokens), config.sampler, config.dtype)
    non_torch = config.non_torch_bytes
    sources["non_torch"] = "given" if non_torch is not None else "assumed"
    if non_torch is None:
        non_torch = NON_TORCH_BYTES
    requested = int(config.gpu_bytes * config.gpu_memory_utilization)
    available = requested - weights - profile - non_torch - config.cuda_graph_bytes
    blocks = blocks_from_available(available, arch, config.tp, config.kv_cache_dtype, config.block_size, config.dtype)
    return ServePlan(
        model=name or arch.name,
        config=config,
        max_model_len=length,
        max_num_seqs=seqs,
        max_num_batched_tokens=tokens,
        weights_bytes=weights,
        profile_peak_bytes=profile,
        non_torch_bytes=non_torch,
        requested_bytes=requested,
        available_kv_bytes=available,
        kv_bytes_per_token=per_token,
        page_bytes=config.block_size * per_token // arch.num_layers,
        num_blocks=blocks,
        sources=sources,
    )


def blocks_from_available(
    available_bytes: int,
    arch: ArchConfig,
    tp: int = 1,
    kv_cache_dtype: str = "auto",
    block_size: int = BLOCK_SIZE,
    dtype: str = "bf16",
) -> int:
    """vLLM's block count from its "Available KV cache memory" (bytes): step 4 alone."""
    page = block_size * kv_bytes_per_token(arch, tp, kv_cache_dtype, dtype) // arch.num_layers
    return max(0, available_bytes) // page // arch.num_layers
