"""`lmforge pretrain` end to end on tiny shards: exact resume after SIGKILL or a vanished shard, the final checkpoint,
activation checkpointing and torch.compile against the plain step, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.errors import LmforgeError
from lmforge.train.loop import checkpoints, read_log
from lmforge.train.pretrain import main, reproduce
from lmforge.train.pretrain_config import PretrainConfig
from tests.train.conftest import write_shards

ROOT = Path(__file__).resolve().parents[2]


def _flags(tok: Path, shards: Path, out: Path, steps: int = 40) -> list[str]:
    return ["pretrain", "--shards", str(shards), "--out", str(out), "--tokenizer", str(tok), "--seq-len", "64",
            "--batch-size", "8", "--max-steps", str(steps), "--warmup-steps", "5", "--save-every", "5",
            "--eval-every", "20", "--val-windows", "4", "--lr", "3e-3", "--no-progress"]


def _cfg(tok: Path, shards: Path, out: Path, **over: object) -> PretrainConfig:
    settings = dict(shards=str(shards), out=str(out), tokenizer=str(tok), seq_len=64, batch_size=8, max_steps=40,
                    warmup_steps=5, save_every=5, eval_every=20, val_windows=4, lr=3e-3, progress=False)
    return PretrainConfig(**settings | over)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(run) if "loss" in r and "event" not in r]


def test_sigkill_then_resume_continues_the_same_curve(tiny_data: tuple[Path, Path], tmp_path: Path,
                                                       one_thread: None) -> None:
    tok, shards = tiny_data
    reference = tmp_path / "reference"
    assert cli_main(_flags(tok, shards, reference)) == 0

    killed = tmp_path / "killed"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *_flags(tok, shards, killed)], env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000015").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it was killed"

    assert cli_main([*_flags(tok, shards, killed), "--resume"]) == 0
    assert _losses(killed) == _losses(reference)  # exactly: same data order, RNG and optimizer state
    ref_log, resumed_log = read_log(reference), read_log(killed)
    assert [r["eval_loss"] for r in resumed_log if "eval_loss" in r] == [r["eval_loss"] for r in ref_log
                                                                          if "eval_loss" in r]


def test_checkpoint_loads_in_transformers_and_reproduces(tiny_data: tuple[Path, Path], tmp_path: Path,
                                                         one_thread: None) -> None:
    from transformers import AutoModelForCausalLM

    from lmforge.checkpoint import load_model

    tok, shards = tiny_data
    result = main(_cfg(tok, shards, tmp_path / "run", max_steps=12, eval_every=6))
    assert result["eval_loss_after"] < result["eval_loss_before"] and result["eval_bpb"] > 0
    model_dir = Path(result["model"])
    lineage = json.loads((model_dir / "lineage.json").read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    assert lineage["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    assert lineage["data"]["shard_sha256"] == [s["sha256"] for s in manifest["shards"]]
    assert lineage["settings"]["lr"] == 3e-3 and lineage["hardware"]["device"] == "cpu"
    assert [r["step"] for r in lineage["log"] if "loss" in r] == list(range(1, 13))

    ours = load_model(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)

    again = reproduce(model_dir, str(tmp_path / "again"), progress=False)
    assert _losses(Path(again["out"])) == _losses(tmp_path / "run")


def test_resume_with_other_settings_is_refused(tiny_data: tuple[Path, Path], tmp_path: Path,
                                               one_thread: None) -> None:
    tok, shards = tiny_data
    main(_cfg(tok, shards, tmp_path / "run", max_steps=2))
    with pytest.raises(LmforgeError, match=r"different run \(lr: 0.003 then, 0.001 now"):
        main(_cfg(tok, shards, tmp_path / "run", max_steps=2, lr=1e-3, resume=True))


def test_shards_of_another_tokenizer_are_refused(tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.tiny import make_tiny_tokenizer

    tok, _ = tiny_data
    other = make_tiny_tokenizer(vocab_size=400)
    other.save(tmp_path / "other")
    shards = write_shards(other, tmp_path / "other", tmp_path / "shards", repeats=2)
    with pytest.raises(LmforgeError, match="tokenized with tokenizer"):
        main(_cfg(tok, shards, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_too_big_for_memory_is_refused_before_starting(tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    tok, shards = tiny_data
    with pytest.raises(LmforgeError, match=r"needs about .* GiB per cpu device .*lmforge plan"):
        main(_cfg(tok, shards, tmp_path / "run", preset="llama-1.1b", batch_size=64, seq_len=2048))
    assert not (tmp_path / "run").exists()


def test_missing_shard_is_a_clear_error(tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    tok, shards = tiny_data
    copy = tmp_path / "shards"
    copy.mkdir()
    for f in shards.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "tokens-00001.bin").unlink()
    with pytest.raises(LmforgeError, match="tokens-00001.bin: shard file missing"):
        main(_cfg(tok, copy, tmp_path / "run"))


def test_shard_vanishing_mid_run_stops_cleanly_and_resume_continues(tiny_data: tuple[Path, Path], tmp_path: Path,
                                                                     one_thread: None) -> None:
    """A shard file moved away while the run holds it open (its memory map would still read): a clear error, the
    checkpoints and log up to then kept; with the file back, --resume lands on the uninterrupted run's curve."""
    tok, shards = tiny_data
    reference = tmp_path / "reference"
    main(_cfg(tok, shards, reference))
    copy, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(shards, copy)
    shard, away = copy / "tokens-00001.bin", tmp_path / "tokens-00001.bin.away"

    def vanish() -> None:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step-00000010").exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        shard.rename(away)

    watcher = threading.Thread(target=vanish, daemon=True)
    watcher.start()
    with pytest.raises(LmforgeError, match=r"tokens-00001.bin: shard 1 vanished or changed mid-run .*--resume"):
        main(_cfg(tok, copy, run))
    watcher.join()
    assert not (run / "model").exists()
    last = int(checkpoints(run)[-1].name.split("-")[1])
    assert last >= 10 and (run / "run.json").is_file()
    assert [s for s, _ in _losses(run)][:last] == list(range(1, last + 1))  # the log up to the checkpoint is kept

    away.rename(shard)
    main(_cfg(tok, copy, run, resume=True))
    assert _losses(run) == _losses(reference)


def test_activation_checkpointing_changes_memory_not_math(tiny_data: tuple[Path, Path], tmp_path: Path,
                                                          one_thread: None) -> None:
    from lmforge.checkpoint import load_model

    tok, shards = tiny_data
    plain = main(_cfg(tok, shards, tmp_path / "plain", max_steps=3, eval_every=0))
    recomputed = main(_cfg(tok, shards, tmp_path / "ckpt", max_steps=3, eval_every=0, checkpointing=True))
    assert _losses(tmp_path / "ckpt") == _losses(tmp_path / "plain")
    a, b = load_model(Path(plain["model"])), load_model(Path(recomputed["model"]))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_compile_changes_speed_not_math(tiny_data: tuple[Path, Path], tmp_path: Path, one_thread: None) -> None:
    """torch.compile (inductor; gcc builds its CPU kernels) against eager: the same losses up to fused kernels'
    float32 rounding, and the step checkpoints and final model are the plain Transformer's, no `_orig_mod.`.
    No held-out windows: compiling the eval graph too would add ~40% to the ~50 s a cold inductor cache costs."""
    from lmforge.checkpoint import load_model
    from lmforge.train.distributed import load_any
    from lmforge.train.loop import TrainConfig, make_optimizer

    tok, shards = tiny_data
    run = dict(seq_len=32, batch_size=4, max_steps=2, val_windows=0, eval_every=0)
    main(_cfg(tok, shards, tmp_path / "eager", **run))
    compiled = main(_cfg(tok, shards, tmp_path / "compiled", compile=True, **run))
    torch.testing.assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-4, atol=0)

    final = load_model(Path(compiled["model"]))  # refuses unexpected (prefixed) tensor names
    model = load_model(Path(compiled["model"]))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = make_optimizer(model, TrainConfig(max_steps=2, lr=3e-3))
    assert load_any(checkpoints(tmp_path / "compiled")[-1], torch.compile(model), opt)["step"] == 2  # as --resume
    assert len(opt.state) == len(list(model.parameters()))  # the moments came back too
    for (name, a), b in zip(model.state_dict().items(), final.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_config_file_with_flag_overrides(tiny_data: tuple[Path, Path], tmp_path: Path, one_thread: None) -> None:
    tok, shards = tiny_data
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"shards": str(shards), "tokenizer": str(tok), "seq-len": 32, "batch_size": 2,
                                  "max_steps": 50, "val_windows": 2, "progress": False}))
    assert cli_main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"), "--max-steps", "2"]) == 0
    settings = json.loads((tmp_path / "run" / "lineage.json").read_text())["settings"]
    assert settings["max_steps"] == 2 and settings["seq_len"] == 32
    config.write_text(json.dumps({"shards": str(shards), "sequence_length": 32}))
    assert cli_main(["pretrain", "--config", str(config), "--out", str(tmp_path / "bad")]) == 1
