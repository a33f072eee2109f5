"""`lmforge dpo` end to end on a tiny checkpoint: it learns a planted preference, the adapter works wherever
--adapter does, full fine-tuning caches its reference log-probs, every loss trains, and a killed run resumes
bit for bit."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import cli
from lmforge.checkpoint import load_checkpoint
from lmforge.loader import open_model
from tests.test_sft import curve, kill_once_saved, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def dpo_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["dpo", "--model", str(base), "--data", str(data), "--out", str(out), "--max-len", "96",
            "--batch-size", "4", "--seed", "1", *extra]


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lora_learns_the_preference_and_the_adapter_works(base: Path, planted: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "dpo"
    args = ["--max-steps", "24", "--eval-every", "12", "--lr", "1e-2", "--beta", "0.5", "--sft-weight", "0.1"]
    assert cli.main(dpo_args(base, planted, out, *args)) == 0
    log = log_of(out)
    first, last = log[0], log[-1]
    assert first["step"] == 0 and first["eval_rewards/accuracy"] == 0.0 and first["eval_rewards/margin"] == 0.0
    assert last["eval_rewards/accuracy"] > 0.9 and last["eval_rewards/margin"] > 0
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
            "logps/rejected", "loss", "tok_s"} <= set(log[1])
    assert {"adapter.safetensors", "adapter_config.json", "lineage.json", "loss.png", "run.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "lineage.json").read_text())["kind"] == "dpo"
    assert "eval_rewards/accuracy_after" in capsys.readouterr().out
    ids = torch.tensor([[5, 9, 100, 42]])
    with torch.no_grad():
        assert not torch.allclose(open_model(str(base), adapter=out).model(ids), load_checkpoint(base)[0](ids))
    assert cli.main(["generate", "--model", str(base), "--adapter", str(out), "--chat", "hi", "--max-new-tokens",
                     "3"]) == 0


def test_full_precomputes_its_reference_once(base: Path, planted: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    args = ["--method", "full", "--max-steps", "3", "--lr", "1e-3"]
    assert cli.main(dpo_args(base, planted, tmp_path / "a", *args)) == 0
    (cached,) = (tmp_path / "cache" / "dpo-reference").glob("*.safetensors")
    assert str(cached) in capsys.readouterr().err and load_file(cached)["logps"].shape == (100, 2)
    stamp = cached.stat().st_mtime_ns
    assert cli.main(dpo_args(base, planted, tmp_path / "b", *args)) == 0  # the same base and pairs: a cache hit
    assert cached.stat().st_mtime_ns == stamp
    # Without the cache, a frozen copy serves as reference: the same numbers.
    assert cli.main(dpo_args(base, planted, tmp_path / "c", *args, "--no-precompute-ref")) == 0
    a, b, c = ([r.get("loss", r.get("eval_loss")) for r in log_of(tmp_path / d)] for d in "abc")
    assert a == b and a == pytest.approx(c, rel=1e-5)
    assert (tmp_path / "a" / "model" / "config.json").is_file()


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo", "apo_zero"])
def test_every_loss_trains(base: Path, planted: Path, tmp_path: Path, loss: str) -> None:
    extra = ["--label-smoothing", "0.1"] if loss == "robust" else []
    assert cli.main(dpo_args(base, planted, tmp_path / loss, "--loss", loss, "--max-steps", "2", *extra)) == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log_of(tmp_path / loss) if "loss" in r)


def test_qlora_reference_is_the_quantized_base(base: Path, planted: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    assert cli.main(dpo_args(base, planted, out, "--method", "qlora", "--quant", "int8", "--max-steps", "2")) == 0
    assert log_of(out)[0]["eval_rewards/margin"] == 0.0  # policy == reference before the first step
    assert json.loads((out / "adapter_config.json").read_text())["quant"] == "int8"


def test_sigkill_then_resume_continues_the_same_run_bit_for_bit(base: Path, planted: Path, tmp_path: Path) -> None:
    args = ["--max-steps", "12", "--save-every", "3", "--eval-every", "6", "--lr", "5e-3", "--lora-dropout", "0.1"]
    reference = run_cli(dpo_args(base, planted, tmp_path / "ref", *args))
    killed = kill_once_saved(run_cli(dpo_args(base, planted, tmp_path / "killed", *args)), tmp_path / "killed", step=3)
    assert reference.wait() == 0, reference.stderr.read().decode()
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "adapter_config.json").exists()
    resumed = run_cli(dpo_args(base, planted, tmp_path / "killed", *args, "--resume"))
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    assert curve(tmp_path / "killed") == curve(tmp_path / "ref")
    rewards = [[r.get("rewards/margin") for r in log_of(tmp_path / d)] for d in ("killed", "ref")]
    assert rewards[0] == rewards[1]
    a, b = load_file(tmp_path / "killed" / "adapter.safetensors"), load_file(tmp_path / "ref" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
