"""`lmforge sft` end to end on a tiny checkpoint: outputs and lineage, adapters used by generate and merge,
output-directory rules, and exact resume after SIGKILL (real subprocesses)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import cli
from lmforge.checkpoint import load_checkpoint, make_lineage, save_checkpoint
from lmforge.loader import open_model
from lmforge.tokenizer import Tokenizer
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


IDS = torch.tensor([[5, 9, 100, 42, 7, 300, 12, 3]])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("base")
    model = make_tiny_model("qwen2-tiny")
    save_checkpoint(directory, model.cfg, model.state_dict(), tiny_tokenizer, make_lineage("tiny test model"))
    return directory


def sft_args(base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sft",
        "--model",
        str(base),
        "--data",
        "builtin:self-cognition",
        "builtin:instructions",
        "--out",
        str(out),
        "--max-len",
        "96",
        "--batch-size",
        "2",
        "--seed",
        "3",
        *extra,
    ]


def test_lora_run_outputs_lineage_and_adapter_use(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert cli.main(sft_args(base, out, "--max-steps", "6", "--eval-every", "3", "--lr", "1e-2")) == 0
    assert {"adapter.safetensors", "adapter_config.json", "lineage.json", "log.jsonl", "loss.png", "run.json"} <= {
        p.name for p in out.iterdir()
    }
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["settings"]["lora_rank"] == 8 and lineage["command"] == shlex.join(sys.argv)
    assert len(lineage["data_sha256"]) == 2 and lineage["parent"]["source"] == "tiny test model"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 3, 6]
    assert "eval_loss_after" in capsys.readouterr().out

    adapted = open_model(str(base), adapter=out).model
    merged_dir = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(base), "--adapter", str(out), "--out", str(merged_dir)]) == 0
    merged, _ = load_checkpoint(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), adapted(IDS))
        assert not torch.allclose(merged(IDS), load_checkpoint(base)[0](IDS))
    assert json.loads((merged_dir / "lineage.json").read_text())["parent"]["kind"] == "sft"
    assert (
        cli.main(["generate", "--model", str(base), "--adapter", str(out), "--chat", "你是谁", "--max-new-tokens", "4"])
        == 0
    )


def test_full_with_mixing_ptuning_and_qlora_runs(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))  # --quant's cached int8 copy stays in tmp_path
    general = tmp_path / "general.txt"
    general.write_text("The quick brown fox jumps over the lazy dog.\n\n机器学习让计算机从数据中学习规律。\n")
    mixing = ["--mix-data", str(general), "--mix-ratio", "0.25"]
    assert cli.main(sft_args(base, tmp_path / "full", "--method", "full", "--max-steps", "2", *mixing)) == 0
    model, _ = load_checkpoint(tmp_path / "full" / "model")
    assert not torch.equal(model.norm.weight, load_checkpoint(base)[0].norm.weight)
    assert json.loads((tmp_path / "full" / "lineage.json").read_text())["data"]["general_pieces"] > 0

    ptuning = ["--method", "ptuning", "--max-steps", "2", "--prefix-len", "4"]
    assert cli.main(sft_args(base, tmp_path / "pt", *ptuning)) == 0
    assert open_model(str(base), adapter=tmp_path / "pt").model.prefix_len == 4

    assert cli.main(sft_args(base, tmp_path / "q", "--method", "qlora", "--quant", "int8", "--max-steps", "2")) == 0
    generate = ["generate", "--model", str(base), "--adapter", str(tmp_path / "q"), "hi", "--max-new-tokens", "3"]
    assert cli.main([*generate, "--quant", "int8"]) == 0
    assert cli.main(generate) == 1
    assert "quantized as int8, and the model is not quantized; load it with --quant int8" in capsys.readouterr().err


def test_output_directory_rules(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert cli.main(sft_args(base, out, "--max-steps", "1")) == 0
    assert cli.main(sft_args(base, out, "--max-steps", "1")) == 1
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert cli.main(sft_args(base, out, "--max-steps", "1", "--lr", "0.5", "--resume")) == 1
    assert "holds a different run (lr: None then, 0.5 now)" in capsys.readouterr().err
    assert cli.main(sft_args(base, out, "--max-steps", "1", "--overwrite")) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert cli.main(sft_args(base, tmp_path / "other", "--max-steps", "1", "--overwrite")) == 1
    assert "holds no lmforge run" in capsys.readouterr().err
    other = make_tiny_model("llama-tiny")
    assert cli.main(["generate", "--model", str(_save(other, tmp_path / "llama")), "--adapter", str(out), "hi"]) == 1
    assert "this adapter was trained on" in capsys.readouterr().err


def _save(model: torch.nn.Module, directory: Path) -> Path:
    from tests.tiny import make_tiny_tokenizer

    save_checkpoint(directory, model.cfg, model.state_dict(), make_tiny_tokenizer(), make_lineage("other"))
    return directory


def run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], env=env, stderr=subprocess.PIPE)


def kill_once_saved(process: subprocess.Popen, out: Path, step: int) -> subprocess.Popen:
    """SIGKILL a training run as soon as its checkpoint of `step` exists (a kill mid-run, state on disk)."""
    checkpoint = out / "checkpoints" / f"step-{step:08d}"
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process


def curve(out: Path) -> list[tuple]:
    """Everything the log says about the run except timings."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("eval_loss")) for r in records]


def test_sigkill_then_resume_continues_the_same_run_bit_for_bit(base: Path, tmp_path: Path) -> None:
    # LoRA dropout on, so the restored RNG state matters as much as the data order and the optimizer moments.
    args = ["--max-steps", "16", "--save-every", "4", "--eval-every", "8", "--lora-dropout", "0.2", "--lr", "5e-3"]
    reference = run_cli(sft_args(base, tmp_path / "ref", *args))

    killed = kill_once_saved(run_cli(sft_args(base, tmp_path / "killed", *args)), tmp_path / "killed", step=4)
    assert reference.wait() == 0, reference.stderr.read().decode()
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "adapter_config.json").exists()

    resumed = run_cli(sft_args(base, tmp_path / "killed", *args, "--resume"))
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    assert curve(tmp_path / "killed") == curve(tmp_path / "ref")
    a, b = load_file(tmp_path / "killed" / "adapter.safetensors"), load_file(tmp_path / "ref" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
