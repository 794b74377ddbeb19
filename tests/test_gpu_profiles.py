"""Every size a chapter picks for a GPU fits the smallest card of that profile: proved by dry runs.

The chapters ask ``vramlab.sizes.pick(cpu=..., gpu15=..., gpu24=..., gpu80=...)`` for their sizes.
This module reads those calls from the notebooks themselves, so a changed size is checked
without editing the test. For each chapter a *skeleton* replays, under ``FakeTensorMode``, the
tensors the notebook creates and keeps on the device in order (models, optimizer state, caches,
what earlier cells leave alive), and the storage tracker reports the peak of live bytes. That
peak, plus ``sizes.CONTEXT_ALLOWANCE`` and ``sizes.ROUNDING_ALLOWANCE``, must fit each GPU
profile's smallest capacity (``sizes.GPU_PROFILES``).

What a dry run differs in, stated once: fake tensors run the CPU kernels (the CPU flash kernel
instead of FlashAttention/memory-efficient attention, whose saved statistics differ by a few
bytes per row), and kernel workspaces and allocator caching are not seen; the allowances cover
those. Where a notebook's step is bounded by a ``budget`` cap, the cap itself is the term.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vramlab import GiB, MiB, format_bytes, live_bytes, measure
from vramlab import sizes as size_profiles
from vramlab.fragmentation import CAPACITY as FRAGMENTATION_CAPACITY
from vramlab.gpt import GPTConfig, TinyGPT

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"
GPU_PROFILES = list(size_profiles.GPU_PROFILES)
SECOND_CONTEXT = 512 * MiB  # a subprocess on the same GPU (chapter 05's allocator experiment) has its own context


# ---- reading the notebooks' picks --------------------------------------------------------------


def _pick_calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """(assignment target, pick call) for every ``pick(...)`` in a cell, in source order."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            t = node.targets[0]
            target = ", ".join(map(ast.unparse, t.elts)) if isinstance(t, ast.Tuple) else ast.unparse(t)
            calls = [n for n in ast.walk(node.value) if isinstance(n, ast.Call) and ast.unparse(n.func) == "pick"]
            found += [(target if len(calls) == 1 else f"{target}#{i}", call) for i, call in enumerate(calls)]
    return found


def notebook_picks(path: Path, profile: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The value of each ``pick`` in the notebook at ``profile``, keyed by the name it is assigned to."""
    monkeypatch.setenv("VRAMLAB_SIZE", profile)
    values: dict[str, Any] = {}
    namespace = {"MiB": MiB, "GiB": GiB, "dict": dict, "pick": size_profiles.pick}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code" or "pick(" not in "".join(cell["source"]):
            continue
        for target, call in _pick_calls(ast.parse("".join(cell["source"]))):
            assert target not in values, f"{path.name}: two picks assigned to {target}"
            values[target] = eval(compile(ast.Expression(call), path.name, "eval"), namespace)
    return values


class Sizes(dict):
    """The picks of one notebook; remembers which ones a skeleton used."""

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.used.add(key)
        return super().__getitem__(key)

    def cfg(self, key: str = "cfg") -> GPTConfig:
        return GPTConfig(**self[key])


# ---- building blocks, all under FakeTensorMode --------------------------------------------------


def ids_for(cfg: GPTConfig, batch: int) -> torch.Tensor:
    return torch.zeros(batch, cfg.seq_len, dtype=torch.long)


def training(cfg: GPTConfig, batch: int, foreach: bool = True) -> tuple[TinyGPT, torch.optim.Optimizer, torch.Tensor]:
    model = TinyGPT(cfg)
    return model, torch.optim.AdamW(model.parameters(), foreach=foreach), ids_for(cfg, batch)


def step(model: TinyGPT, opt: torch.optim.Optimizer, ids: torch.Tensor, zero: bool = True) -> None:
    model.loss(ids).backward()
    opt.step()
    if zero:
        opt.zero_grad(set_to_none=True)


def pinned_host_bytes(fn: Callable[[], None]) -> int:
    """Bytes ``save_on_cpu(pin_memory=True)`` pins while ``fn`` runs: one host copy per saved
    tensor (a tensor saved twice is copied twice; nothing is deduplicated), each taken from the
    caching host allocator, which rounds a request up to a power of two and keeps it cached."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        nbytes = t.numel() * t.element_size()
        total += 1 << (nbytes - 1).bit_length() if nbytes else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


# ---- one skeleton per chapter: returns the peak of live device bytes -----------------------------


def ch00(s: Sizes) -> int:
    n_in, n_out, batch = s["n_in, n_out, batch"]
    layer, x = torch.nn.Linear(n_in, n_out), torch.randn(batch, n_in)
    layer(x)
    y = layer(x)  # noqa: F841  (kept by the notebook)
    model, opt, ids = training(s.cfg(), s["batch"])
    loss = model.loss(ids)
    loss.backward()
    opt.step()  # section 4 keeps `loss` and the gradients
    opt.zero_grad(set_to_none=True)
    loss = model.loss(ids)  # section 5: the forward alone, then steps (the budgeted one stops earlier)
    del loss
    for _ in range(2):
        step(model, opt, ids)
    return 0


def ch02(s: Sizes) -> int:
    cfg = s.cfg()
    model, opt, ids = training(cfg, s["batch"])
    step(model, opt, ids)  # the timeline cell's first step: AdamW's state exists from here on
    step(model, opt, ids, zero=False)  # its measured second step; the model keeps its gradients from here on
    for foreach in (False, True):  # optimizer_peak
        m, o, _ = training(cfg, 1, foreach=foreach)
        step(m, o, ids, zero=False)
        del m, o
    for set_to_none in (True, False):  # second_step_peak
        m, o, _ = training(cfg, 1)
        step(m, o, ids, zero=False)
        o.zero_grad(set_to_none=set_to_none)
        step(m, o, ids, zero=False)
        del m, o
    m = TinyGPT(cfg)  # the frozen-embedding cell keeps m and o
    m.tok.weight.requires_grad_(False)
    o = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], foreach=True)
    step(m, o, ids, zero=False)
    return 0


def ch03(s: Sizes) -> int:
    lengths, (hidden, heads) = s["lengths"], s["hidden, heads"]
    for attention in ("eager", "sdpa"):
        c = GPTConfig(vocab_size=256, seq_len=lengths[0], hidden=hidden, layers=1, heads=heads, attention=attention)
        TinyGPT(c).loss(ids_for(c, 1)).backward()
    net = None
    for attention in ("eager", "sdpa"):
        for n in lengths:
            c = GPTConfig(vocab_size=256, seq_len=n, hidden=hidden, layers=1, heads=heads, attention=attention)
            net = TinyGPT(c)  # the previous net (with its gradients) is freed only when this name is rebound
            net.loss(ids_for(c, 1)).backward()
    net = None  # the cell ends with `del net, x`
    cfg = s.cfg()
    model, opt, warm = training(cfg, 1)
    step(model, opt, warm)
    for n in s["batch_sizes"]:
        step(model, opt, ids_for(cfg, n))
    return 0


def ch04(s: Sizes) -> int:
    cfg = s.cfg()
    batch, prompt_len, new_tokens = s["batch, prompt_len, new_tokens"]
    model = TinyGPT(cfg).eval()
    prompt = ids_for(cfg, batch)[:, :prompt_len]
    cache = model.new_cache()
    with torch.inference_mode():
        logits = model(prompt, cache)
        del logits
        # the decode steps, one token each, end with the cache at prompt + new tokens; one forward
        # over all but the last new token is an upper bound on them (larger logits), then the last
        logits = model(ids_for(cfg, batch)[:, : new_tokens - 1], cache, start=prompt_len)
        logits = model(logits[:, -1:].argmax(-1), cache, start=prompt_len + new_tokens - 1)
    ids = ids_for(cfg, s["ids"])
    model.train()
    for context in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with context():
            out = model(ids)
        del out
    return 0


def ch05(s: Sizes) -> int:
    cfg = s.cfg()
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    step(model, opt, ids_for(cfg, 1))
    b1, b2 = s["b1, b2"]
    for b in (b1, b2):  # the two unbudgeted measurements of section 3
        step(model, opt, ids_for(cfg, b))
    # every other step runs under budget(LIMIT); the allocator experiment is a subprocess with its
    # own context and a capped allocator, after the notebook empties its cache; the allocator-settings
    # cell then allocates 1100 MiB (1280 MiB rounded) in a subprocess of its own, one at a time
    child = max(FRAGMENTATION_CAPACITY, 1280 * MiB)
    return max(s["LIMIT"], live_bytes(model, opt) + child + SECOND_CONTEXT)


def ch06(s: Sizes) -> int:
    cfg = s.cfg()
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    batches = [ids_for(cfg, 4) for _ in range(8)]
    total = 0  # leak 1: every iteration's graph stays alive
    for ids in batches:
        total = total + model.loss(ids)
    del total
    kept = []  # leak 2: logits kept
    for ids in batches:
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        kept.append(logits)
    del kept, logits
    records = []  # leak 3: cycles collected only at the end (gc disabled)
    for ids in batches:
        step(model, opt, ids)
        records.append(model.tok.weight.detach().clone())
    del records
    seen: list[torch.Tensor] = []  # leak 4: a hook stores block 0's output
    hook = model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out))
    for ids in batches:
        step(model, opt, ids)
    hook.remove()
    seen.clear()
    big = [ids_for(cfg, s["big"]) for _ in range(5)]
    step(model, opt, big[0])  # on the device; offloaded keeps less
    return 0  # the swap-myth cells ask CUDA for more than the card and fill it on purpose: both only probe it


def ch06_generation(s: Sizes) -> int:
    """Section 5 of chapter 06, after the training objects of the sections before it."""
    cfg, gen_cfg = s.cfg(), s.cfg("gen_cfg")
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    step(model, opt, ids_for(cfg, 4))
    big = [ids_for(cfg, s["big"]) for _ in range(5)]  # noqa: F841  (alive in the notebook)
    gen = TinyGPT(gen_cfg).eval()
    batch_sizes, contexts = s["batch_sizes"], s["contexts"]
    runs = [(b, contexts[1]) for b in batch_sizes] + [(batch_sizes[1], c) for c in contexts]
    with torch.inference_mode():
        for batch, context in runs:
            prompt = ids_for(gen_cfg, batch)[:, :context]
            cache = gen.new_cache()
            logits = gen(prompt, cache)
            for i in range(8):
                logits = gen(logits[:, -1:].argmax(-1), cache, start=context + i)
            del cache, logits, prompt
    return 0


def ch07(s: Sizes) -> int:
    cfg = s.cfg()  # the timing cell: fp32 steps, then 16-bit autocast steps, on one model
    model, opt, ids = training(cfg, 8)
    for _ in range(2):
        step(model, opt, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(ids)
    loss.backward()
    opt.step()
    return 0


def ch08(s: Sizes) -> int:
    cfg, effective = s.cfg(), s["EFFECTIVE"]
    model, opt, ids = training(cfg, effective)

    def accumulate(m: TinyGPT, o: torch.optim.Optimizer, k: int) -> None:
        o.zero_grad(set_to_none=True)
        for chunk in ids.chunk(k):
            (m.loss(chunk) / k).backward()
        o.step()

    for k in (1, 1, 2):  # the peak falls with every smaller micro-batch; the notebook goes on to k=32
        accumulate(model, opt, k)

    def grads_after(k: int) -> list[torch.Tensor]:
        m = TinyGPT(cfg)
        for chunk in ids.chunk(k):
            m.loss(chunk).backward()
        return [p.grad for p in m.parameters()]

    full = grads_after(1)
    for k in (2, 4, 8):
        grads_after(k)
    undivided = grads_after(4)  # noqa: F841
    del full
    return 0


def ch09(s: Sizes) -> int:
    cfg = s.cfg()
    ids = ids_for(cfg, s["ids"])
    plans = [{}, dict(attention_only=True), dict(every=2), dict(every=1)]
    kept = []
    for plan in plans:
        model = TinyGPT(cfg).set_checkpointing(**plan)
        model.loss(ids).backward()
        kept.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        model.loss(ids).backward()
        del model
    layers, width, rows = 16, s["L, width, rows#0"], s["L, width, rows#1"]
    chain = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()) for _ in range(layers)]
    )
    x = torch.randn(rows, width, requires_grad=True)
    for segments in (1, 2, 4, 8, 16):
        torch.utils.checkpoint.checkpoint_sequential(chain, segments, x, use_reentrant=False).sum().backward()
        chain.zero_grad(set_to_none=True)
        x.grad = None
    for layers_ in (1, 2):
        m = TinyGPT(GPTConfig(**{**cfg.__dict__, "layers": layers_}))
        loss = m.loss(ids)
        del m, loss
    for segments in [n for n in (1, 2, 4, 8) if cfg.layers % n == 0] + [cfg.layers]:
        m = TinyGPT(cfg).set_checkpointing(segments=segments)
        m.loss(ids).backward()
        del m
    return 0


def ch10(s: Sizes) -> int:
    t = torch.empty(256 * MiB, dtype=torch.uint8)  # the cache demo, freed before the model exists
    del t
    x = torch.randn(8 * MiB)
    y = x.clone().relu_().mul_(2)  # noqa: F841  (kept)
    cfg = s.cfg()
    model, opt, ids = training(cfg, s["model, opt, ids"])
    for _ in range(4):  # warm-up, measured, profiled, snapshot
        step(model, opt, ids)
    return 0


def ch11(s: Sizes) -> int:
    cfg = s.cfg()
    ids = ids_for(cfg, s["ids"])
    model, opt, _ = training(cfg, 1)  # the notebook's global model and optimizer, AdamW at worst
    step(model, opt, ids)
    second, opt2, _ = training(cfg, 1)  # each cell's fresh model next to it
    for _ in range(2):
        step(second, opt2, ids, zero=False)
    extra = list(TinyGPT(cfg).parameters())  # noqa: F841  (the `largest`/`sqrt_v` lines build one more)
    return 0


SKELETONS: dict[str, list[Callable[[Sizes], int]]] = {
    "00_start_here": [ch00],
    "02_training_memory_anatomy": [ch02],
    "03_activations_and_attention": [ch03],
    "04_inference_and_kv_cache": [ch04],
    "05_anatomy_of_an_oom": [ch05],
    "06_slow_unstable_and_leaking": [ch06, ch06_generation],
    "07_mixed_precision": [ch07],
    "08_gradient_accumulation_and_micro_batching": [ch08],
    "09_activation_checkpointing": [ch09],
    "10_freeing_reusing_and_the_tools": [ch10],
    "11_optimizer_state_and_offload": [ch11],
}


def dry_peak(skeleton: Callable[[Sizes], int], sizes: Sizes) -> int:
    """max(peak of live bytes while the skeleton runs, the bound the skeleton returns)."""
    with FakeTensorMode(), measure(device="cpu") as m:
        bound = skeleton(sizes)
    assert m.source == "dry-run"
    return max(m.peak_bytes, bound)


# ---- the tests ----------------------------------------------------------------------------------


def test_every_chapter_that_picks_sizes_has_a_skeleton():
    picking = {p.stem for p in CHAPTERS.glob("*.ipynb") if "pick(" in p.read_text()}
    assert picking == set(SKELETONS)


_RUNS: dict[tuple[str, str], tuple[int, set[str]]] = {}


def chapter_run(chapter: str, profile: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, set[str]]:
    """(peak bytes, picks the skeletons used) of a chapter at a profile; profiles whose picks
    are the same share one run."""
    values = notebook_picks(CHAPTERS / f"{chapter}.ipynb", profile, monkeypatch)
    key = (chapter, repr(sorted(values.items())))
    if key not in _RUNS:
        peak, used = 0, set()
        for skeleton in SKELETONS[chapter]:
            sizes = Sizes(values)
            peak = max(peak, dry_peak(skeleton, sizes))
            used |= sizes.used
        _RUNS[key] = peak, used
    return _RUNS[key]


@pytest.mark.parametrize("chapter", sorted(SKELETONS))
def test_skeletons_use_every_pick(chapter, monkeypatch):
    values = notebook_picks(CHAPTERS / f"{chapter}.ipynb", "gpu15", monkeypatch)
    _, used = chapter_run(chapter, "gpu15", monkeypatch)
    assert used == set(values), f"picks not replayed by the skeleton: {set(values) - used}"


@pytest.mark.parametrize("profile", GPU_PROFILES)
@pytest.mark.parametrize("chapter", sorted(SKELETONS))
def test_chapter_sizes_fit_the_profile(chapter, profile, monkeypatch):
    peak, _ = chapter_run(chapter, profile, monkeypatch)
    capacity = size_profiles.GPU_PROFILES[profile]
    need = peak * (1 + size_profiles.ROUNDING_ALLOWANCE) + size_profiles.CONTEXT_ALLOWANCE
    assert size_profiles.fits_profile(peak, profile), (
        f"{chapter} at {profile}: peak {format_bytes(peak)} + allowances = {format_bytes(int(need))} "
        f"> {format_bytes(capacity)}"
    )


def ch06_pinned_host_bytes(sizes: Sizes) -> int:
    """Pinned host bytes chapter 06 holds at once on a GPU: the offloaded step's copies (cached by
    the host allocator after the step) plus the weight-streaming cell's pinned fp32 block weights."""
    with FakeTensorMode():
        cfg = sizes.cfg()
        model, ids = TinyGPT(cfg), ids_for(cfg, sizes["big"])
        activations = pinned_host_bytes(lambda: model.loss(ids))
    gen = sizes.cfg("gen_cfg")
    block_params = gen.params - (gen.vocab_size + gen.seq_len + 2) * gen.hidden  # all but embeddings and final norm
    return activations + 4 * block_params


@pytest.mark.parametrize("profile", ["gpu15", "gpu24"])
def test_offloaded_activations_fit_a_colab_host(profile, monkeypatch):
    """Chapter 06 offloads a step's saved activations to pinned host memory on a GPU (Colab's
    T4 and L4 hosts have 12.7 GB; an 80 GB card's host is larger)."""
    sizes = Sizes(notebook_picks(CHAPTERS / "06_slow_unstable_and_leaking.ipynb", profile, monkeypatch))
    pinned = ch06_pinned_host_bytes(sizes)
    assert pinned <= size_profiles.PINNED_HOST_LIMIT, format_bytes(pinned)


def test_pinned_host_bytes_count_every_copy_rounded_up():
    """The count the review found missing: chapter 06's old gpu15 batch of 16 pins more than 5 GiB
    (157 copies, power-of-two rounding), over the 4 GiB limit; distinct storages said 3.52 GiB."""
    cfg = dict(vocab_size=32000, seq_len=512, hidden=768, layers=6, heads=12)  # chapter 06 at gpu15
    gen = dict(vocab_size=256, seq_len=64, hidden=64, layers=2, heads=2)
    pinned = ch06_pinned_host_bytes(Sizes({"cfg": cfg, "big": 16, "gen_cfg": gen}))
    assert pinned > 5 * GiB > size_profiles.PINNED_HOST_LIMIT
    with FakeTensorMode():
        seen: list[int] = []
        model, ids = TinyGPT(GPTConfig(**cfg)), ids_for(GPTConfig(**cfg), 1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
            model.loss(ids)
    assert len(seen) > len({*seen})  # some tensor is saved twice: copies, not storages, are what is pinned


def test_a_size_too_big_for_a_t4_fails_the_check(monkeypatch):
    """The check can fail: chapter 03's earlier GPU sizes (batch 32 at 1024 tokens) do not fit a T4."""
    cfg = dict(vocab_size=32000, seq_len=1024, hidden=768, layers=12, heads=12)
    sizes = Sizes({"lengths": [512], "hidden, heads": (512, 8), "cfg": cfg, "batch_sizes": [32]})
    peak = dry_peak(ch03, sizes)
    assert peak > 16 * GiB and not size_profiles.fits_profile(peak, "gpu15")
