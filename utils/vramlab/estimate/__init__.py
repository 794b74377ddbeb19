"""Closed-form memory estimates of decoder-only transformers, every size in bytes.

Sources of the formulas:
- Parameter count: the module shapes of the published architectures (GPT-2: Radford et
  al. 2019; Llama: Touvron et al. 2023, arXiv:2302.13971 and 2307.09288; GQA: Ainslie et
  al. 2023, arXiv:2305.13245).
- Weights, gradients and optimizer state per parameter: Rajbhandari et al., "ZeRO"
  (arXiv:1910.02054), section 3.1 (16 bytes per parameter for mixed-precision Adam), and
  the optimizer implementations of ``torch.optim`` (the foreach Adam/AdamW step keeps one
  parameter-sized temporary, ``exp_avg_sq_sqrt``).
- Activations: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198), section 4: count the tensors autograd saves for backward,
  per token and per layer. Here the count is redone for the layers as transformers
  implements them (RMSNorm upcast to fp32, SwiGLU, rotary embeddings, GELU-tanh for GPT-2)
  and for each precision recipe, so the terms differ from the paper's 34·s·b·h; eager
  attention adds the a·s² terms, fused attention (SDPA/flash, Dao et al. 2022,
  arXiv:2205.14135) keeps only a log-sum-exp per head and token.
- Inference: weights plus the KV cache 2 · layers · kv_heads · head_dim · seq · batch ·
  bytes (Pope et al., "Efficiently Scaling Transformer Inference", arXiv:2211.05102),
  plus the transient working set of the prefill.

The peak of a training step is the largest of a few moments: the end of the forward pass,
the start of backward (loss gradients over the vocabulary), just after the LM head's
backward, the end of backward, and the optimizer step. :func:`estimate` returns each.
"""

from .activations import (
    Term,
    activation_bytes,
    block_backward_bytes,
    checkpoint_input_bytes,
    head_terms,
    korthikanti_bytes_per_layer,
    layer_terms,
    rotary_bytes,
)
from .params import linear_shapes, matmul_param_count, param_count, param_counts_by_part, param_tensor_shapes
from .peaks import Estimate, estimate, kv_cache_bytes, kv_cache_bytes_classic
from .qlora import LORA_TARGETS, NF4_BLOCK, lora_param_count, nf4_tensor_bytes, qlora_estimate
from .states import (
    BNB_BLOCK,
    BNB_MIN_8BIT_SIZE,
    DTYPE_BYTES,
    offload_bytes,
    offload_split,
    optimizer_state_bytes,
    optimizer_temp_bytes,
    weight_bytes,
)
from .zero import ZERO_STAGES, sharded_states_per_gpu, zero_bytes_per_rank

__all__ = [
    "BNB_BLOCK",
    "BNB_MIN_8BIT_SIZE",
    "DTYPE_BYTES",
    "Estimate",
    "LORA_TARGETS",
    "NF4_BLOCK",
    "Term",
    "ZERO_STAGES",
    "activation_bytes",
    "block_backward_bytes",
    "checkpoint_input_bytes",
    "estimate",
    "head_terms",
    "korthikanti_bytes_per_layer",
    "kv_cache_bytes",
    "kv_cache_bytes_classic",
    "layer_terms",
    "linear_shapes",
    "lora_param_count",
    "matmul_param_count",
    "nf4_tensor_bytes",
    "offload_bytes",
    "offload_split",
    "optimizer_state_bytes",
    "optimizer_temp_bytes",
    "param_count",
    "param_counts_by_part",
    "param_tensor_shapes",
    "qlora_estimate",
    "rotary_bytes",
    "sharded_states_per_gpu",
    "weight_bytes",
    "zero_bytes_per_rank",
]
