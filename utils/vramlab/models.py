"""Real decoder-only LLM architectures by their published configuration numbers.

Each entry copies the numbers from the model's published ``config.json`` (layers, hidden
size, heads, key/value heads, MLP width, vocabulary, tied embeddings). No weights are
involved: the course builds these shapes on fake tensors (:mod:`vramlab.dryrun`) or feeds
them to formulas (:mod:`vramlab.estimate`).
"""

from __future__ import annotations

import difflib
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


@dataclass(frozen=True)
class HFModel:
    """A Hugging Face ``config.json`` of a model type that vramlab's formula does not cover
    (Gemma, Phi-3, Qwen3, OLMo-2, Falcon, GPT-NeoX, Mixtral and other MoE, ...). A dry run
    builds the config's own transformers class from it; :func:`vramlab.estimate` refuses it."""

    name: str
    model_type: str
    config: dict[str, Any]
    source: str = ""
    why_no_formula: str = ""  # set when the type is one the formula models but a field of this config is not


def no_formula(model: HFModel) -> ValueError:
    """The error for a formula asked about a config it does not model."""
    why = model.why_no_formula or (
        f"vramlab has no formula for model_type {model.model_type!r} (the formula covers {', '.join(FAMILIES)})"
    )
    return ValueError(
        f"{why}; `vramlab dryrun --config ...` (vramlab.dryrun) measures it by building transformers' own class "
        "(dry run; no formula)"
    )


def get_arch(name_or_config: str | ArchConfig | HFModel) -> ArchConfig:
    """Look up an architecture by registry name (case-insensitive), or pass one through."""
    if isinstance(name_or_config, ArchConfig):
        return name_or_config
    if isinstance(name_or_config, HFModel):
        raise no_formula(name_or_config)
    key = str(name_or_config).strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, list(REGISTRY), n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    raise KeyError(
        f"unknown model {name_or_config!r}; {guess}known models: {', '.join(REGISTRY)} "
        "(or pass a config.json with --config / from_hf_config)"
    )


def check_positions(arch: ArchConfig, seq: int) -> None:
    """Refuse a sequence longer than a model with learned positions (GPT-2) has positions for."""
    if arch.family == "gpt2" and seq > arch.max_position:
        raise ValueError(f"{arch.name} has learned positions for at most {arch.max_position} tokens; got seq={seq}")


def from_hf_config(source: str | Path | dict[str, Any], name: str | None = None) -> ArchConfig:
    """Build an :class:`ArchConfig` from a Hugging Face ``config.json`` (a path or its dict).

    Every field that changes a shape is read, and what vramlab does not model is refused with
    a ValueError that says so (rather than answered with a wrong number): a missing
    ``model_type``, a ``head_dim`` other than hidden / heads, an active sliding window
    shorter than the context, biases in Llama-style projections."""
    data, default_name = _read_config(source)
    check_rope_scaling(data)
    model_type = data.get("model_type")
    if model_type is None:
        raise ValueError(
            "config.json has no model_type, so vramlab cannot tell the architecture; "
            f"supported model types: {', '.join(FAMILIES)}"
        )
    family = {"gpt2": "gpt2", "llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(str(model_type).lower())
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    field = _ConfigFields(data)
    hidden = field.integer("hidden_size", "n_embd")
    heads = field.integer("num_attention_heads", "n_head")
    layers = field.integer("num_hidden_layers", "n_layer")
    max_position = field.integer("max_position_embeddings", "n_positions", default=4096)
    _refuse_unmodelled(field, family, hidden, heads, max_position)
    return ArchConfig(
        name=printable(name or str(data.get("_name_or_path") or default_name)),
        family=family,
        vocab_size=field.integer("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=field.integer("num_key_value_heads", default=heads),
        intermediate_size=field.integer(
            "intermediate_size", "n_inner", default=4 * hidden if family == "gpt2" else None
        ),
        max_position=max_position,
        tie_embeddings=field.boolean("tie_word_embeddings", default=family == "gpt2"),
        source=str(source) if not isinstance(source, dict) else "dict",
    )


ROPE_TYPES = ("default", "dynamic", "linear", "llama3", "longrope", "proportional", "yarn", "mrope")
"""``rope_scaling`` types transformers knows (``ROPE_INIT_FUNCTIONS``, plus default and mrope)."""


def check_rope_scaling(data: dict[str, Any]) -> None:
    """Refuse a ``rope_scaling`` (or ``rope_parameters``) that transformers could not use: an
    unknown type or a factor that is not a positive number. It does not change memory, but a
    config that names it is not the model it claims to be."""
    for key in ("rope_scaling", "rope_parameters"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"config.json field {key} must be an object, got {value!r:.60}")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"config.json {key} type {kind!r:.40} is not one of {', '.join(ROPE_TYPES)}")
        factor = value.get("factor")
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0):
            raise ValueError(f"config.json {key} factor must be a positive number, got {factor!r:.40}")


def load_config(source: str | Path | dict[str, Any], name: str | None = None) -> ArchConfig | HFModel:
    """A ``config.json`` as an :class:`ArchConfig` when its model type is one the formula
    models (every shape field read, the rest refused, see :func:`from_hf_config`), else as an
    :class:`HFModel` for a dry run of transformers' own class."""
    data, default_name = _read_config(source)
    check_rope_scaling(data)
    model_type = data.get("model_type")
    why = ""
    if isinstance(model_type, str) and model_type.lower() in FAMILIES:
        try:
            return from_hf_config(source, name)
        except NotModelled as err:  # a field the formula does not model: the dry run still can
            why = str(err)
    if isinstance(model_type, str):
        return HFModel(
            name=printable(name or str(data.get("_name_or_path") or default_name)),
            model_type=model_type,
            config=dict(data),
            source=str(source) if not isinstance(source, dict) else "dict",
            why_no_formula=why,
        )
    return from_hf_config(source, name)


def printable(name: str) -> str:
    """``name`` safe to print: control characters (terminal escapes, newlines) become '?'."""
    return "".join(ch if ch.isprintable() else "?" for ch in name)[:200]


def _read_config(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, dict):
        return source, "custom"
    if not isinstance(source, (str, Path)):
        raise ValueError(f"pass the path of a config.json or its dict, not a {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}: pass the path of a Hugging Face config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) is fine
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the object a config.json holds")
    return data, (path.parent.name or path.stem) if path.stem == "config" else path.stem


class NotModelled(ValueError):
    """A config field that changes a shape in a way vramlab's formula does not model."""


class _ConfigFields:
    """Typed reads of config.json fields, each error naming the field."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def _get(self, keys: tuple[str, ...], default: Any) -> tuple[str, Any]:
        for key in keys:
            if self.data.get(key) is not None:
                return key, self.data[key]
        if default is None:
            raise ValueError(f"config.json lacks {' / '.join(keys)}")
        return keys[0], default

    def integer(self, *keys: str, default: int | None = None) -> int:
        key, value = self._get(keys, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**40:
            raise ValueError(f"config.json field {key} must be a positive whole number below 2**40, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if type(value) is int and value in (0, 1):  # some configs write true/false as 1/0
            return bool(value)
        if not isinstance(value, bool):
            raise ValueError(f"config.json field {key} must be true or false, got {value!r}")
        return value


def _refuse_unmodelled(field: _ConfigFields, family: str, hidden: int, heads: int, max_position: int) -> None:
    if field.data.get("head_dim") is not None:
        head_dim = field.integer("head_dim")
        if head_dim * heads != hidden:
            raise NotModelled(
                f"head_dim {head_dim} differs from hidden_size / num_attention_heads = {hidden / heads:g}: "
                "projections of another width than the hidden size are not modelled by vramlab yet"
            )
    window = field.data.get("sliding_window")
    if window is not None and field.boolean("use_sliding_window", True):
        if field.integer("sliding_window") < max_position:
            raise NotModelled(
                f"sliding_window {window} is shorter than the context ({max_position} positions): the formula does "
                "not model a sliding window (transformers' window mask, and a cache that holds a view of the "
                "prefill's keys and values until the first generated token)"
            )
    if family in ("llama", "mistral"):
        for key in ("attention_bias", "mlp_bias"):
            if field.boolean(key, False):
                raise NotModelled(f"{key}: true (biases in the projections) is not modelled by vramlab yet")
