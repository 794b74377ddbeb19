"""Any transformers causal LM, built from its own ``config.json`` for a dry run.

vramlab's formula covers the GPT-2 and Llama-style families (:mod:`vramlab.models`). For any
other model type (Gemma-2/3, Phi-3, Qwen3, OLMo-2, StableLM, GPT-NeoX, Falcon, Mixtral and
other mixtures of experts) a dry run builds the class transformers itself builds for that
config, so every field the model reads shapes the trace. The result is labelled
"dry run; no formula".

Conventions, the same as a real run of ``model(input_ids=ids, labels=ids)``:

- attention is what transformers picks for the config (Gemma-2 picks eager attention, for its
  logit soft-capping); where that is SDPA over plain causal attention, the unpadded run's
  mask-free call is traced (a fake tensor cannot show that the mask is all ones), and where
  layers use a sliding window, transformers builds the window's mask, as it does for real;
- dropout is the config's;
- mixture-of-experts layers run transformers' grouped-matmul experts kernel, which takes bf16
  only: use the pure bf16 recipe. Every token's activations go through its top-k experts, so
  activations follow the *active* parameters while weights, gradients and optimizer state
  follow the *total*.
"""

from __future__ import annotations

from typing import Any

import torch

from .models import HFModel
from .setups import Setup

_NOT_CONFIG = ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "model_type")
_POSITIONS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _config(model: HFModel) -> Any:
    """transformers' config object for ``model`` (its own class, every field read)."""
    from .quantize import quiet_imports

    with quiet_imports():
        import transformers
    with quiet_imports():  # again: importing transformers resets its logger's level to WARNING
        try:
            return transformers.AutoConfig.for_model(
                model.model_type, **{k: v for k, v in model.config.items() if k not in _NOT_CONFIG}
            )
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"transformers {transformers.__version__} has no model_type {model.model_type!r}; "
                "upgrade transformers, or check the config.json"
            ) from err
        except (TypeError, RecursionError, Exception) as err:  # e.g. huggingface_hub's strict field validation
            first = " ".join(str(err).split())[:300] or type(err).__name__  # one line, whatever it held
            raise ValueError(f"{model.name}: transformers could not read this config.json: {first}") from None


def _experts(config: Any) -> tuple[int, int]:
    """(experts per layer, experts per token), or (0, 0) for a dense model."""
    total = next(
        (
            getattr(config, k)
            for k in ("num_local_experts", "num_experts", "n_routed_experts")
            if isinstance(getattr(config, k, None), int)
        ),
        0,
    )
    active = getattr(config, "num_experts_per_tok", 0) or 0
    return (total, active) if total and active else (0, 0)


def check_setup(model: HFModel, setup: Setup) -> int:
    """Refuse what a dry run of ``model`` cannot trace truthfully; return its vocabulary size."""
    config = _config(model)
    positions = next((getattr(config, k) for k in _POSITIONS if isinstance(getattr(config, k, None), int)), None)
    if positions is not None and setup.seq > positions:
        raise ValueError(f"{model.name} has {positions} positions; got seq={setup.seq}")
    if _experts(config)[0] and setup.recipe != "bf16":
        raise ValueError(
            f"{model.name} is a mixture of experts: transformers runs its experts with a grouped matmul that "
            f"takes bf16 only, so dry runs of it use --recipe bf16 (got {setup.recipe})"
        )
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"{model.name}: the config has no vocab_size")
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 1:
        raise ValueError(f"{model.name}: num_hidden_layers must be 1 or more, got {layers}")
    if _is_encoder(model.model_type) and not getattr(config, "is_decoder", False):
        raise ValueError(
            f"{model.name}: {model.model_type} is an encoder (a masked language model), not a causal LM; "
            'vramlab dry-runs causal LMs. Set "is_decoder": true in the config for its causal-LM head.'
        )
    return vocab


def _is_encoder(model_type: str) -> bool:
    """Whether transformers knows ``model_type`` as a masked LM (BERT and kin), whose causal-LM
    head is a decoder only when the config says ``is_decoder``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _sliding(config: Any) -> bool:
    layer_types = getattr(config, "layer_types", None) or []
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return bool(windowed) or any("sliding" in str(t) for t in layer_types)


def build(model: HFModel, dtype: torch.dtype, attention: str, mask_free: str) -> tuple[torch.nn.Module, dict]:
    """Build ``model``'s own causal-LM class in ``dtype`` (under a fake mode, unless tiny);
    return it with what the trace assumed: model type, attention, experts, parameters."""
    from .quantize import quiet_imports

    config = _config(model)
    if attention == "eager":
        config._attn_implementation = "eager"
    from .dryrun import default_dtype

    with quiet_imports(), default_dtype(dtype):  # this thread's default dtype: other threads see none of it
        import transformers

        try:
            net = transformers.AutoModelForCausalLM.from_config(config)
        except (AssertionError, ValueError, TypeError, RuntimeError, IndexError) as err:
            what = f"{model.name}: transformers cannot build {model.model_type} from this config"
            if "Unrecognized configuration class" in str(err):  # its message lists some 200 classes
                raise ValueError(f"{what}: {model.model_type} has no causal-LM class in transformers") from None
            raise ValueError(f"{what}: {' '.join(str(err).split())[:300]}") from None
    chosen = net.config._attn_implementation
    attention_note = ""
    if chosen == "sdpa" and not _sliding(net.config):
        attention_note = _use_mask_free(net, mask_free)
    total, active = _experts(net.config)
    params = sum(p.numel() for p in net.parameters())
    experts = sum(p.numel() for n, p in net.named_parameters() if ".experts." in n or n.endswith(".experts"))
    details = {
        "formula": "none (dry run; no formula)",
        "model_type": model.model_type,
        "attention": chosen + attention_note,
    }
    if total:
        active_params = params - experts + experts * active // total
        details.update(experts=total, experts_per_token=active, active_params=active_params)
    return net, details


def _use_mask_free(net: torch.nn.Module, mask_free: str) -> str:
    """Switch ``net`` to the mask-free causal SDPA call of an unpadded real run, if its
    attention module accepts it (a 16-token forward tells); say what was traced."""
    from .quantize import quiet_imports

    masked = (
        " (with the (batch, 1, seq, seq) mask transformers builds for a fake tensor; "
        "a real unpadded run has none, so this trace holds that mask more)"
    )
    own_code = (
        " (the model's own attention code, which vramlab cannot switch to the mask-free call: where it "
        "builds a (batch, 1, seq, seq) mask for a fake tensor, a real unpadded run would not)"
    )
    with quiet_imports():
        try:
            net.set_attn_implementation(mask_free)
        except (ValueError, NotImplementedError):
            return own_code
    if net.config._attn_implementation != mask_free:  # the class keeps its own attention code
        return own_code
    probe = torch.zeros(1, 16, dtype=torch.long)
    try:
        with torch.no_grad():
            net(input_ids=probe, use_cache=False)
    except RuntimeError:
        net.set_attn_implementation("sdpa")
        return masked
    return " (the unpadded run's causal call, no mask)"


def describe(details: dict) -> str:
    """One line for the text output of a dry run without a formula."""
    line = f"dry run; no formula: model_type {details['model_type']}, {details['attention']} attention"
    if "experts" in details:
        line += (
            f"; {details['experts']} experts, {details['experts_per_token']} per token: "
            f"{details['active_params']:,} active parameters per token"
        )
    return line
