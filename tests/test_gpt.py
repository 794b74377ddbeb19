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


@pytest.mark.parametrize(
    "setting",
    [dict(every=1), dict(every=2), dict(attention_only=True), dict(segments=2), dict(every=1, save_matmuls=True)],
    ids=str,
)
def test_checkpointing_keeps_gradients_and_lowers_the_peak(setting):
    from vramlab import measure

    cfg = GPTConfig(vocab_size=64, seq_len=32, hidden=32, layers=4, heads=4)
    ids = random_batch(cfg, 4)

    def run(**kw):
        torch.manual_seed(0)
        model = TinyGPT(cfg).set_checkpointing(**kw)
        with measure(model, ids) as m:
            model.loss(ids).backward()
        return m.peak_bytes, [p.grad for p in model.parameters()]

    plain_peak, plain = run()
    peak, grads = run(**setting)
    assert peak < plain_peak
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain))


def test_checkpointing_bad_arguments():
    model = TinyGPT(GPTConfig(layers=4))
    with pytest.raises(ValueError):
        model.set_checkpointing(segments=3)
    with pytest.raises(ValueError):
        model.set_checkpointing(every=-1)
    with pytest.raises(ValueError, match="set every=1"):
        model.set_checkpointing(save_matmuls=True)


def test_selective_checkpointing_saves_between_none_and_every_block():
    """Selective checkpointing keeps the matmul and attention outputs: more than a block's input,
    less than everything."""
    from vramlab import measure

    cfg = GPTConfig(vocab_size=64, seq_len=32, hidden=32, layers=4, heads=4)
    ids = random_batch(cfg, 4)
    saved = {}
    for name, kw in {"none": {}, "full": dict(every=1), "selective": dict(every=1, save_matmuls=True)}.items():
        model = TinyGPT(cfg).set_checkpointing(**kw)
        with measure(model, ids) as m:
            loss = model.loss(ids)
        saved[name] = m.end_delta_bytes
        del loss
    assert saved["full"] < saved["selective"] < saved["none"]


def test_pattern_batch_is_learnable_and_in_range():
    from vramlab.gpt import pattern_batch

    cfg = GPTConfig(vocab_size=50, seq_len=20)
    ids = pattern_batch(cfg, 4, seed=1)
    assert ids.shape == (4, 20) and ids.min() >= 0 and ids.max() < 50
    steps = (ids[:, 1:] - ids[:, :-1]) % 50
    assert (steps == steps[:, :1]).all()  # a constant stride per sequence
