import pytest
import torch

from vramlab.gpt import GPTConfig, TinyGPT, random_batch


def test_param_count_formula():
    cfg = GPTConfig(vocab_size=100, seq_len=32, hidden=48, layers=3, heads=4)
    model = TinyGPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.params


def test_kv_cache_generation_equals_recomputing_everything():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=50, seq_len=24, hidden=32, layers=2, heads=4)).eval()
    prompt = random_batch(model.cfg, 2)[:, :8]
    fast = model.generate(prompt, 6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(fast, ids)


def test_eager_and_sdpa_agree():
    torch.manual_seed(0)
    a = TinyGPT(GPTConfig(attention="sdpa", seq_len=16))
    b = TinyGPT(GPTConfig(attention="eager", seq_len=16))
    b.load_state_dict(a.state_dict())
    ids = random_batch(a.cfg, 2)
    assert torch.allclose(a(ids), b(ids), atol=1e-5)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=32, seq_len=16, hidden=32, layers=1, heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = random_batch(model.cfg, 8)
    first = model.loss(ids).item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(ids).backward()
        opt.step()
    assert model.loss(ids).item() < 0.7 * first


@pytest.mark.parametrize("bad", [dict(hidden=30, heads=4), dict(layers=0), dict(attention="flash")])
def test_bad_configs(bad):
    with pytest.raises(ValueError):
        GPTConfig(**bad)


def test_too_long_input():
    model = TinyGPT(GPTConfig(seq_len=8))
    with pytest.raises(ValueError, match="exceed seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
