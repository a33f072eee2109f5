"""The training loss (loop.summed_loss): cross-entropy over the kept target positions only, worked in chunks with
an in-place backward, must equal PyTorch's own cross-entropy over the full logits, in value and in gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.train.loop import IGNORE, summed_loss
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(ignored: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (3, 100), generator=g)  # 297 targets: more than one 64-row chunk, and a partial one
    targets = ids[:, 1:].clone()
    targets[:, :ignored] = IGNORE  # prompt tokens carry no loss
    return {"input_ids": ids[:, :-1], "targets": targets}


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_equals_torch_cross_entropy_in_value_and_gradients(name: str) -> None:
    ours = make_tiny_model(name).requires_grad_(True)
    peer = copy.deepcopy(ours)
    b = batch(ignored=30)
    loss, count = summed_loss(ours, b, torch.device("cpu"))
    logits = peer(b["input_ids"])  # (B, T, V): every position, the loss masked by ignore_index
    expected = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=IGNORE, reduction="sum")
    assert count == int((b["targets"] != IGNORE).sum()) == 3 * 69
    torch.testing.assert_close(loss, expected)
    (loss / count).backward()
    (expected / count).backward()
    for (n, p), q in zip(ours.named_parameters(), peer.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_no_targets_and_no_grad() -> None:
    model = make_tiny_model("llama-tiny").requires_grad_(True)
    loss, count = summed_loss(model, batch(ignored=99), torch.device("cpu"))
    assert count == 0 and float(loss.detach()) == 0.0
    loss.backward()  # a step may hold a micro-batch without targets
    with torch.no_grad():
        held_out, _ = summed_loss(model, batch(ignored=30), torch.device("cpu"))
    assert held_out.requires_grad is False and float(held_out) > 0
