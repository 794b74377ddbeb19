"""vramlab.loss: the chunked cross-entropy equals Hugging Face's loss and never holds all logits."""

import pytest
import torch

from vramlab import measure
from vramlab.loss import chunked_cross_entropy, full_cross_entropy


def _run(fn):
    torch.manual_seed(0)
    h = torch.randn(2, 256, 32, requires_grad=True)
    w = (torch.randn(4096, 32) * 0.02).requires_grad_()
    labels = torch.randint(0, 4096, (2, 256))
    labels[:, ::5] = -100  # ignored positions count in neither the sum nor the mean
    with measure(h, w, labels) as m:
        loss = fn(h, w, labels)
        loss.backward()
    return loss.detach(), h.grad, w.grad, m.peak_delta_bytes


def test_same_loss_and_gradients_with_a_fraction_of_the_memory():
    full = _run(full_cross_entropy)
    chunked = _run(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk=64))
    assert torch.allclose(full[0], chunked[0]) and torch.allclose(full[1], chunked[1], atol=1e-7)
    assert torch.allclose(full[2], chunked[2], atol=1e-7)
    logits = 2 * 256 * 4096 * 4
    assert full[3] >= 2 * logits  # fp32 logits and their gradient (at least)
    assert chunked[3] < full[3] / 4  # 64 of 512 tokens at a time


def test_bad_chunk_and_shapes_are_refused():
    h, w, y = torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(4, dtype=torch.long)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk must be a positive"):
            chunked_cross_entropy(h, w, y, chunk=bad)
    with pytest.raises(ValueError, match="one label per token"):
        chunked_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))
