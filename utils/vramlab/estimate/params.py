"""Parameter counts and tensor shapes of decoder-only transformers, from their configuration."""

from __future__ import annotations

from ..models import ArchConfig, get_arch


def param_counts_by_part(arch: ArchConfig) -> dict[str, int]:
    """Parameter count of each part of the model (embedding, attention, mlp, norms, head)."""
    h, i, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    gpt2 = arch.family == "gpt2"
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if arch.qkv_bias:
        attention += q_out + 2 * kv_out
    if gpt2:
        attention += h  # output projection bias
    mlp = (3 * h * i) if arch.gated_mlp else (2 * h * i + i + h)
    norm = 2 * h if gpt2 else h
    groups = {
        "embedding": arch.vocab_size * h + (arch.max_position * h if gpt2 else 0),
        "attention": layers * attention,
        "mlp": layers * mlp,
        "norms": (2 * layers + 1) * norm,
        "head": 0 if arch.tie_embeddings else arch.vocab_size * h,
    }
    return groups


def param_count(model: str | ArchConfig) -> int:
    """Number of parameters of a decoder-only transformer from its configuration."""
    return sum(param_counts_by_part(get_arch(model)).values())


def matmul_param_count(arch: ArchConfig) -> int:
    """Parameters that feed matrix products (linear weights and biases, the LM head):
    the ones autocast copies to 16 bit. Embedding lookups and norms are not copied."""
    groups = param_counts_by_part(arch)
    head = arch.vocab_size * arch.hidden_size  # tied heads still cast the shared matrix
    return groups["attention"] + groups["mlp"] + head


def param_tensor_shapes(arch: ArchConfig) -> list[tuple[int, ...]]:
    """The shape of every parameter tensor, as transformers builds them (bitsandbytes and
    Adafactor treat tensors by size and shape)."""
    h, i, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q_out, kv_out = arch.num_heads * hd, arch.num_kv_heads * hd
    shapes: list[tuple[int, ...]] = [(arch.vocab_size, h)]
    if arch.family == "gpt2":
        shapes.append((arch.max_position, h))
        layer = [(h,), (h,), (h, 3 * h), (3 * h,), (h, h), (h,), (h,), (h,), (h, i), (i,), (i, h), (h,)]
        final = [(h,), (h,)]
    else:
        layer = [(h,), (q_out, h), (kv_out, h), (kv_out, h), (h, q_out), (h,), (i, h), (i, h), (h, i)]
        if arch.qkv_bias:
            layer += [(q_out,), (kv_out,), (kv_out,)]
        final = [(h,)]
    shapes += layer * arch.num_layers + final
    if not arch.tie_embeddings:
        shapes.append((arch.vocab_size, h))
    return shapes


def linear_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear layer of one decoder block, by short name."""
    h, i = arch.hidden_size, arch.intermediate_size
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes = {"q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out)}
    if arch.gated_mlp:
        shapes.update(gate=(i, h), up=(i, h), down=(h, i))
    else:
        shapes.update(up=(i, h), down=(h, i))
    return shapes
