"""The deterministic shard loader and the WSD schedule, against values computed from the raw token stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.shards import TokenShards
from lmforge.train.loop import TrainConfig, lr_at
from lmforge.train.shard_loader import ShardBatches


@pytest.fixture(scope="module")
def shards(tiny_data: tuple[Path, Path]) -> TokenShards:
    return TokenShards.open(tiny_data[1])


def test_windows_are_the_stream_across_shard_boundaries(shards: TokenShards) -> None:
    assert len(shards.tokens) >= 2  # the fixture makes several shards, so windows do cross boundaries
    stream = np.concatenate([np.asarray(t, dtype=np.int64) for t in shards.tokens])
    loader = ShardBatches(shards, seq_len=64, batch_size=4, val_windows=4)
    for j in range(loader.train_windows + 4):
        np.testing.assert_array_equal(loader.window(j), stream[j * 64 : j * 64 + 65])


def test_steps_are_pure_and_ranks_split_the_global_batch(shards: TokenShards) -> None:
    one = ShardBatches(shards, seq_len=32, batch_size=2, grad_accum=2, seed=3, val_windows=4)
    ranks = [ShardBatches(shards, seq_len=32, batch_size=2, seed=3, val_windows=4, rank=r, world=2) for r in (0, 1)]
    for step in (0, 5, 400):  # 400 steps run past the first epoch
        together = torch.cat([b["input_ids"] for b in one(step)])
        split = torch.cat([ranks[r](step)[0]["input_ids"] for r in (0, 1)])
        torch.testing.assert_close(together, split, rtol=0, atol=0)
        torch.testing.assert_close(one(step)[0]["targets"], ShardBatches(shards, 32, 2, 2, 3, 4)(step)[0]["targets"])
    epoch = [int(w) for k in range(one.train_windows) for w in [one._permutation(0)[k]]]
    assert sorted(epoch) == list(range(one.train_windows))  # each training window once per epoch
    held = torch.cat([b["input_ids"] for b in one.held_out()])
    trained = {tuple(r.tolist()) for s in range(one.train_windows // 4) for b in one(s) for r in b["input_ids"]}
    assert not trained & {tuple(r.tolist()) for r in held}


def test_wsd_schedule() -> None:
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_ratio=0.2)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(50, cfg) == 1.0 and lr_at(79, cfg) == 1.0
    assert lr_at(89, cfg) == pytest.approx(1.0 - 0.9 * 10 / 20) and lr_at(99, cfg) == pytest.approx(0.1)
