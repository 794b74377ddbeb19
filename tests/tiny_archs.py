"""Tiny Llama- and GPT-2-shaped architectures: small enough for real CPU runs in tests."""

from vramlab import get_arch

TINY_LLAMA = get_arch("llama-2-7b").with_(
    name="tiny-llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=160
)
TINY_GPT2 = get_arch("gpt2").with_(
    name="tiny-gpt2",
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=256,
    max_position=128,
)
# Three blocks and a 1001-row vocabulary: torch.chunk gives rank 0 of two ranks one row more than
# rank 1 (the sharded dry run's validation on gloo ranks)
SMALL_LLAMA = TINY_LLAMA.with_(
    name="small-llama",
    num_layers=3,
    hidden_size=128,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=352,
    vocab_size=1001,
)
