"""Self-healing in the shared loop: a planted NaN batch and a planted loss spike are caught, rolled back and skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.train.healing import Healer, HealingConfig
from lmforge.train.loop import TrainConfig, read_log, train
from tests.tiny import make_tiny_model

NAN_STEP, SPIKE_STEP, POISON = 12, 17, 7


def _batches(step: int) -> list[dict[str, torch.Tensor]]:
    """A repeating pattern the model learns fast; data step SPIKE_STEP has random targets (a spike), NAN_STEP starts
    with the POISON token, which the model's hook turns into NaN logits."""
    g = torch.Generator().manual_seed(step)
    ids = (torch.arange(33)[None, :] % 5 + 10).repeat(4, 1)  # (4, 33)
    if step == SPIKE_STEP:
        ids = torch.randint(0, 512, (4, 33), generator=g)
    if step == NAN_STEP:
        ids[:, 0] = POISON
    return [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}]


def _poisoned_model() -> torch.nn.Module:
    model = make_tiny_model()

    def nan_on_poison(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * float("nan") if bool((args[0][:, 0] == POISON).any()) else output

    model.register_forward_hook(nan_on_poison)
    return model


def test_nan_and_spike_are_rolled_back_and_skipped(tmp_path: Path, one_thread: None) -> None:
    cfg = TrainConfig(max_steps=24, lr=3e-3, save_every=5, keep_last=2, progress=False)
    healer = Healer(HealingConfig(spike_factor=3.0, min_steps=5, cooldown_steps=3, cooldown_factor=0.5))
    counters = train(_poisoned_model(), _batches, [], cfg, tmp_path, healer=healer)

    log = read_log(tmp_path)
    events = [r for r in log if "event" in r]
    assert [(e["event"], e["data_step"]) for e in events] == [("nonfinite", NAN_STEP), ("spike", SPIKE_STEP)]
    assert events[0]["rolled_back_to"] == 10 and events[1]["rolled_back_to"] == 15
    assert counters["step"] == 24 and counters["skipped"] == [NAN_STEP, SPIKE_STEP] and counters["rollbacks"] == 2
    records = [r for r in log if "loss" in r and "event" not in r]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, 25))  # the redone steps replace the rolled-back ones, once each
    losses = [r["loss"] for r in records]
    assert all(loss == loss for loss in losses) and losses[-1] < 0.5 * losses[0]
    assert [e["step"] for e in events] == [13, 17]  # the training step that was refused
    after = [r for r in records if r["step"] == 16][0]
    assert after["lr"] == pytest.approx(0.5 * cfg.lr * _cosine(15, cfg))  # cooled down after the rollback


def _cosine(step: int, cfg: TrainConfig) -> float:
    from lmforge.train.loop import lr_at

    return lr_at(step, cfg) / cfg.lr


def test_gives_up_after_max_rollbacks(tmp_path: Path, one_thread: None) -> None:
    def always_poison(step: int) -> list[dict[str, torch.Tensor]]:
        batch = _batches(step)[0]
        batch["input_ids"][:, 0] = POISON if step >= 3 else 10
        return [batch]

    cfg = TrainConfig(max_steps=10, lr=1e-3, save_every=2, progress=False)
    with pytest.raises(LmforgeError, match="after 2 rollbacks"):
        train(_poisoned_model(), always_poison, [], cfg, tmp_path, healer=Healer(HealingConfig(max_rollbacks=2)))
    assert [r["event"] for r in read_log(tmp_path) if "event" in r] == ["nonfinite", "nonfinite"]
