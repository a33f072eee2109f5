"""The lm-evaluation-harness adapter: its log-likelihoods against a plain forward, and one local task end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint
from tests.serve_server import write_tiny_checkpoint

pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "answer": 0},
    {"question": "中国的首都是", "choices": ["上海", "北京", "广州"], "answer": 1},
    {"question": "2 + 3 =", "choices": ["4", "6", "5"], "answer": 2},
    {"question": "Water freezes at", "choices": ["0 degrees", "50 degrees", "100 degrees"], "answer": 0},
    {"question": "一年有几个月？", "choices": ["十个", "十二个", "十五个"], "answer": 1},
]

TASK = """task: lmforge_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lm_eval") / "tiny")


def _direct(model: torch.nn.Module, ids: list[int], n_cont: int) -> float:
    """Log-likelihood of the last n_cont tokens from one plain causal forward (no cache, no sharing)."""
    logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))


def test_loglikelihood_equals_a_plain_forward(tiny_dir: Path, one_thread: None) -> None:
    from lm_eval.api.instance import Instance

    from lmforge.eval.lm_eval_adapter import LmforgeLM

    lm = LmforgeLM(model=str(tiny_dir))
    model, _ = load_checkpoint(tiny_dir)
    requests = [Instance("loglikelihood", {}, (q["question"] + "\nAnswer:", " " + c), i)
                for i, q in enumerate(QUESTIONS) for c in q["choices"]]
    requests.append(Instance("loglikelihood", {}, ("", "hello"), 99))  # empty context: conditioned on the boundary
    got = lm.loglikelihood(requests)
    for req, (logp, greedy) in zip(requests, got, strict=True):
        ctx, cont = lm._pair(*req.args)
        assert logp == pytest.approx(_direct(model, ctx + cont, len(cont)), abs=1e-4)
        assert isinstance(greedy, bool)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text to score, 一些文字",), 0)])
    assert rolling[0] < 0


def test_lm_eval_command_runs_a_local_task(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lmforge_local_mc.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lmforge.eval.lm_eval_adapter", "--model", "lmforge", "--model_args",
           f"model={tiny_dir}", "--tasks", "lmforge_local_mc", "--include_path", str(tasks), "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results*.json")).read_text())
    acc = results["results"]["lmforge_local_mc"]["acc,none"]

    # The same questions scored directly: the option with the highest log-likelihood, as lmforge eval picks it.
    model, _ = load_checkpoint(tiny_dir)
    from lmforge.eval.lm_eval_adapter import LmforgeLM

    lm = LmforgeLM(model=str(tiny_dir))
    correct = 0
    for q in QUESTIONS:
        scores = []
        for c in q["choices"]:
            ctx, cont = lm._pair(q["question"] + "\nAnswer:", " " + c)
            scores.append(_direct(model, ctx + cont, len(cont)))
        correct += scores.index(max(scores)) == q["answer"]
    assert acc == pytest.approx(correct / len(QUESTIONS))
