"""The shared training loop: schedule, weight-decay groups, accumulation, checkpoints without pickles."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from lmforge.model import Transformer
from lmforge.train.loop import IGNORE, TrainConfig, accumulate, checkpoints, lr_at, make_optimizer, train
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_warmup_then_cosine_by_hand() -> None:
    cfg = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    got = [lr_at(s, cfg) for s in (0, 1, 2, 6, 10)]
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), 0.1]
    assert all(math.isclose(a, b) for a, b in zip(got, expected, strict=True))


def test_matrices_decay_vectors_do_not() -> None:
    model = make_tiny_model("qwen2-tiny")
    opt = make_optimizer(model, TrainConfig(max_steps=1, lr=1e-3, weight_decay=0.1))
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert rest["weight_decay"] == 0.0 and all(p.dim() == 1 for p in rest["params"])  # norms and q/k/v biases
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def batch(rows: slice) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 512, (4, 10), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:].clone()
    targets[0, :6] = IGNORE  # rows with different numbers of targets: the mean must be over the whole step
    return {"input_ids": ids[rows, :-1], "targets": targets[rows]}


def gradients(model: Transformer, micro: list[dict[str, torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
    model.requires_grad_(True)
    loss, _ = accumulate(model, micro, torch.device("cpu"))
    return loss, [p.grad for p in model.parameters()]


def test_accumulation_equals_one_big_batch() -> None:
    base = make_tiny_model("llama-tiny")
    loss, whole = gradients(copy.deepcopy(base), [batch(slice(0, 4))])
    split_loss, split = gradients(copy.deepcopy(base), [batch(slice(0, 1)), batch(slice(1, 4))])
    assert math.isclose(loss, split_loss, rel_tol=1e-6)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_checkpoints_are_safetensors_and_json_and_pruned(tmp_path: Path) -> None:
    model = make_tiny_model("llama-tiny").requires_grad_(True)
    cfg = TrainConfig(max_steps=6, lr=1e-3, save_every=2, keep_last=2, progress=False)
    train(model, lambda step: [batch(slice(0, 4))], [batch(slice(0, 2))], cfg, tmp_path)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    files = {p.name for p in checkpoints(tmp_path)[-1].iterdir()}
    assert files == {"trainable.safetensors", "optimizer.safetensors", "state.json"}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
