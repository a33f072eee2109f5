"""Real torch.distributed on CPU: 2 gloo processes with DDP and FSDP2 follow the 1-process loss curve for the same
global batch (under FSDP, continuing a checkpoint whose weights only rank 0 reads), a sharded checkpoint written by
2 ranks loads into 1 process, and a 2-process run killed with SIGKILL resumes onto the uninterrupted run's curve."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lmforge.checkpoint import save_checkpoint
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import read_log
from lmforge.train.pretrain import main
from lmforge.train.pretrain_config import PretrainConfig
from tests.tiny import make_tiny_model

# Same math, different summation order (all-reduce of per-rank gradients): equal to float32 rounding, amplified a
# little over the steps by Adam.
RTOL = 1e-4


def _cfg(tok: Path, shards: Path, out: Path, **over: object) -> PretrainConfig:
    settings = dict(shards=str(shards), out=str(out), tokenizer=str(tok), seq_len=32, batch_size=4, max_steps=6,
                    warmup_steps=2, save_every=3, eval_every=3, val_windows=4, lr=3e-3, progress=False)
    return PretrainConfig(**settings | over)


def _rank(rank: int, port: int, cfg: PretrainConfig, rank1_init: str | None = None) -> None:
    """One of 2 ranks; rank1_init: another --init for rank 1 alone."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    main(dataclasses.replace(cfg, init=rank1_init) if rank == 1 and rank1_init else cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run) if "loss" in r and "event" not in r]


@pytest.fixture(scope="module")
def start(tiny_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initial checkpoint for every run: a fresh FSDP2 init draws each shard's numbers on its own rank, so
    only a shared start makes the curves comparable."""
    out = tmp_path_factory.mktemp("start") / "model"
    model = make_tiny_model()
    save_checkpoint(out, model.cfg, model.state_dict(), tiny_tokenizer, {"source": "test"})
    return out


@pytest.fixture(scope="module")
def one_process(tiny_data: tuple[Path, Path], start: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok, shards = tiny_data
    out = tmp_path_factory.mktemp("dist") / "single"
    torch.set_num_threads(1)
    main(_cfg(tok, shards, out, grad_accum=2, init=str(start)))  # the same global batch as 2 ranks x 4 rows
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_follow_one_process(strategy: str, one_process: Path, start: Path, tiny_data: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    tok, shards = tiny_data
    out = tmp_path / strategy
    cfg = _cfg(tok, shards, out, distributed=strategy, init=str(start))
    rank1_init = None
    if strategy == "fsdp":  # rank 0 broadcasts the weights: rank 1 continues a copy of `start` with no weights file
        no_weights = shutil.ignore_patterns("*.safetensors")
        rank1_init = str(shutil.copytree(start, tmp_path / "config-only", ignore=no_weights))
    mp.spawn(_rank, args=(_free_port(), cfg, rank1_init), nprocs=2, join=True)
    torch.testing.assert_close(_losses(out), _losses(one_process), rtol=RTOL, atol=0)
    evals = [[r["eval_loss"] for r in read_log(run) if "eval_loss" in r] for run in (out, one_process)]
    torch.testing.assert_close(evals[0], evals[1], rtol=RTOL, atol=0)

    if strategy == "fsdp":  # the last checkpoint is sharded (DCP); it loads into one plain process
        from lmforge.checkpoint import load_model
        from lmforge.train.distributed import load_any
        from lmforge.train.loop import TrainConfig, checkpoints, make_optimizer

        last = checkpoints(out)[-1]
        assert (last / ".metadata").is_file() and (last / "__0_0.distcp").is_file()
        final = load_model(out / "model")
        model = load_model(out / "model")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        opt = make_optimizer(model, TrainConfig(max_steps=6, lr=3e-3))
        counters = load_any(last, model, opt)
        assert counters["step"] == 6
        for (name, a), b in zip(model.state_dict().items(), final.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert len(opt.state) == len(list(model.parameters()))  # the moments came back too


def test_fsdp_builds_on_meta_and_learns(tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    """A fresh FSDP2 model is made on the meta device and initialised shard by shard; it must still learn."""
    tok, shards = tiny_data
    cfg = _cfg(tok, shards, tmp_path / "fresh", distributed="fsdp", max_steps=6, save_every=0)
    mp.spawn(_rank, args=(_free_port(), cfg), nprocs=2, join=True)
    evals = [r["eval_loss"] for r in read_log(tmp_path / "fresh") if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.2


def test_two_ranks_killed_then_resumed_continue_the_same_curve(start: Path, tiny_data: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    """SIGKILL both FSDP2 ranks once a sharded checkpoint exists; resumed on 2 ranks, the losses equal exactly those
    of an uninterrupted 2-rank run (same ranks, same reduction order, so no tolerance)."""
    tok, shards = tiny_data
    run = dict(distributed="fsdp", init=str(start), max_steps=24, save_every=4, eval_every=12)
    reference = tmp_path / "reference"
    mp.spawn(_rank, args=(_free_port(), _cfg(tok, shards, reference, **run)), nprocs=2, join=True)

    killed = tmp_path / "killed"
    ranks = mp.start_processes(_rank, args=(_free_port(), _cfg(tok, shards, killed, **run)), nprocs=2, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-00000008").exists() and all(p.is_alive() for p in ranks.processes):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for p in ranks.processes:
        p.kill()  # SIGKILL: no cleanup, no final checkpoint
    for p in ranks.processes:
        p.join()
    assert not (killed / "model").exists(), "the run finished before it was killed"

    mp.spawn(_rank, args=(_free_port(), _cfg(tok, shards, killed, resume=True, **run)), nprocs=2, join=True)
    assert _losses(killed) == _losses(reference)
    evals = [[r["eval_loss"] for r in read_log(d) if "eval_loss" in r] for d in (killed, reference)]
    assert evals[0] == evals[1] and len(evals[0]) == 3
