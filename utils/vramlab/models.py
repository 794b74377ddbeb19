"""Real decoder-only LLM architectures by their published configuration numbers.

Each entry copies the numbers from the model's published ``config.json`` (layers, hidden
size, heads, key/value heads, MLP width, vocabulary, tied embeddings). No weights are
involved: the course builds these shapes on fake tensors (:mod:`vramlab.dryrun`) or feeds
them to formulas (:mod:`vramlab.estimate`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ArchConfig:
    """The shape of a decoder-only transformer.

    ``family`` picks the block layout: "gpt2" (LayerNorm, GELU MLP of width
    ``intermediate_size``, learned positions, biases everywhere) or a Llama-style family
    (RMSNorm, SwiGLU MLP, rotary positions; "qwen2" adds biases to q/k/v).
    """

    name: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int
    tie_embeddings: bool
    source: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; use one of {FAMILIES}")
        for field_name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_position",
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{self.name}: {field_name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{self.name}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU (gate, up, down projections) rather than a two-layer GELU MLP."""
        return self.family != "gpt2"

    @property
    def qkv_bias(self) -> bool:
        return self.family in ("gpt2", "qwen2")

    def with_(self, **changes: Any) -> ArchConfig:
        """A copy with some fields changed, e.g. ``cfg.with_(num_layers=2)``."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _llama(
    name: str,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv: int,
    inter: int,
    pos: int,
    tie: bool,
    family: str,
    source: str,
) -> ArchConfig:
    return ArchConfig(name, family, vocab, hidden, layers, heads, kv, inter, pos, tie, source)


def _gpt2(name: str, hidden: int, layers: int, heads: int, source: str) -> ArchConfig:
    return ArchConfig(name, "gpt2", 50257, hidden, layers, heads, heads, 4 * hidden, 1024, True, source)


_HF = "config.json of the Hugging Face repository "
REGISTRY: dict[str, ArchConfig] = {
    cfg.name: cfg
    for cfg in (
        _gpt2("gpt2", 768, 12, 12, _HF + "openai-community/gpt2"),
        _gpt2("gpt2-medium", 1024, 24, 16, _HF + "openai-community/gpt2-medium"),
        _gpt2("gpt2-large", 1280, 36, 20, _HF + "openai-community/gpt2-large"),
        _gpt2("gpt2-xl", 1600, 48, 25, _HF + "openai-community/gpt2-xl"),
        _llama("llama-2-7b", 32000, 4096, 32, 32, 32, 11008, 4096, False, "llama", _HF + "meta-llama/Llama-2-7b-hf"),
        _llama("llama-2-13b", 32000, 5120, 40, 40, 40, 13824, 4096, False, "llama", _HF + "meta-llama/Llama-2-13b-hf"),
        _llama("llama-2-70b", 32000, 8192, 80, 64, 8, 28672, 4096, False, "llama", _HF + "meta-llama/Llama-2-70b-hf"),
        _llama("llama-3-8b", 128256, 4096, 32, 32, 8, 14336, 8192, False, "llama", _HF + "meta-llama/Meta-Llama-3-8B"),
        _llama("mistral-7b", 32000, 4096, 32, 32, 8, 14336, 32768, False, "mistral", _HF + "mistralai/Mistral-7B-v0.1"),
        _llama("qwen2.5-0.5b", 151936, 896, 24, 14, 2, 4864, 32768, True, "qwen2", _HF + "Qwen/Qwen2.5-0.5B"),
        _llama("qwen2.5-1.5b", 151936, 1536, 28, 12, 2, 8960, 32768, True, "qwen2", _HF + "Qwen/Qwen2.5-1.5B"),
    )
}


def get_arch(name_or_config: str | ArchConfig) -> ArchConfig:
    """Look up an architecture by registry name (case-insensitive), or pass one through."""
    if isinstance(name_or_config, ArchConfig):
        return name_or_config
    key = str(name_or_config).strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    raise KeyError(
        f"unknown model {name_or_config!r}; known models: {', '.join(REGISTRY)} "
        "(or pass a config.json with --config / from_hf_config)"
    )


def from_hf_config(source: str | Path | dict[str, Any], name: str | None = None) -> ArchConfig:
    """Build an :class:`ArchConfig` from a Hugging Face ``config.json`` (a path or its dict)."""
    if isinstance(source, dict):
        data, default_name = source, "custom"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}: pass the path of a Hugging Face config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        default_name = path.parent.name or path.stem
    model_type = str(data.get("model_type", "llama")).lower()
    family = {"gpt2": "gpt2", "llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(model_type)
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")

    def pick(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if data.get(key) is not None:
                return data[key]
        if default is None:
            raise ValueError(f"config.json lacks {' / '.join(keys)}")
        return default

    hidden = int(pick("hidden_size", "n_embd"))
    heads = int(pick("num_attention_heads", "n_head"))
    default_inter = 4 * hidden if family == "gpt2" else None
    return ArchConfig(
        name=name or str(data.get("_name_or_path") or default_name),
        family=family,
        vocab_size=int(pick("vocab_size")),
        hidden_size=hidden,
        num_layers=int(pick("num_hidden_layers", "n_layer")),
        num_heads=heads,
        num_kv_heads=int(pick("num_key_value_heads", default=heads)),
        intermediate_size=int(pick("intermediate_size", "n_inner", default=default_inter)),
        max_position=int(pick("max_position_embeddings", "n_positions", default=4096)),
        tie_embeddings=bool(pick("tie_word_embeddings", default=family in ("gpt2",))),
        source=str(source) if not isinstance(source, dict) else "dict",
    )
