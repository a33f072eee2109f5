"""Multiple-choice scoring speed: lmforge beside lm-evaluation-harness's `hf` backend, same model, same task, same run.

    python bench/eval.py [--model smollm2-135m-instruct] [--limit N] [--batch-size 8] [--rounds 3] [--threads 1]

The task is lmforge's shipped bilingual knowledge set (48 four-option questions) written as an lm_eval local task
(JSONL + YAML in a temporary folder). Three settings, all on the same float checkpoint:
- `hf`: lm_eval with transformers (`HFLM`, fp32, CPU, --batch-size);
- `lmforge via lm_eval`: the same lm_eval task, prompts and metric through lmforge's adapter, so only the model
  backend differs from `hf`: this ratio is the headline;
- `lmforge eval`: our own runner on the same questions with its own prompt template, for reference.
Model loading is not timed. After one warm-up pass each, the settings take turns, one whole pass each per round
(--rounds), so that a change in the machine's load falls on all of them; each reports its median examples/s and
accuracy, and the speed ratios are medians of the per-round ratios. The two lm_eval settings must agree on
accuracy (same log-likelihoods up to float error). --threads sets torch's threads (default: torch's own choice).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASK = """task: lmforge_knowledge
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def write_task(folder: Path, limit: int | None) -> tuple[Path, int]:
    from lmforge.eval.tasks import datasets_dir

    text = (datasets_dir() / "knowledge_mc.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    rows = rows[:limit] if limit else rows
    data = folder / "knowledge.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "choices": r["choices"],
                                        "answer": "ABCD".index(r["answer"])}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    (folder / "lmforge_knowledge.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    return folder, len(rows)


def timed_rounds(passes: dict[str, Callable[[], float]], rounds: int) -> dict[str, tuple[list[float], float]]:
    """Per setting: (seconds of each round's pass, accuracy), the settings taking turns after one warm-up each."""
    acc = {name: run() for name, run in passes.items()}
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, run in passes.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: (times[name], acc[name]) for name in passes}


def lm_eval_pass(lm: object, task_dir: Path) -> Callable[[], float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir))

    def run() -> float:
        out = simple_evaluate(model=lm, tasks=["lmforge_knowledge"], task_manager=manager, verbosity="ERROR")
        return out["results"]["lmforge_knowledge"]["acc,none"]

    return run


def lmforge_pass(checkpoint: Path, limit: int | None) -> Callable[[], float]:
    from lmforge.eval import multiple_choice
    from lmforge.eval.tasks import parse_tasks
    from lmforge.loader import open_model

    loaded = open_model(str(checkpoint), None, None)
    task = parse_tasks("knowledge")[0]

    def run() -> float:
        result = multiple_choice.evaluate(loaded.model, loaded.tokenizer, task, limit=limit, progress=False)
        return result.metrics()["acc"]

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=None, help="questions (default: all 48)")
    ap.add_argument("--batch-size", type=int, default=8, help="lm_eval hf batch size")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes of each setting, taken in turns")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    from lmforge.catalog import pull
    from lmforge.eval.lm_eval_adapter import LmforgeLM

    checkpoint = pull(args.model, progress=False)
    hf_name = "hf (lm_eval, transformers)"
    with tempfile.TemporaryDirectory() as tmp:
        task_dir, n = write_task(Path(tmp), args.limit)
        passes = {
            hf_name: lm_eval_pass(
                HFLM(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=args.batch_size), task_dir),
            "lmforge via lm_eval": lm_eval_pass(LmforgeLM(model=str(checkpoint)), task_dir),
            "lmforge eval (own prompts)": lmforge_pass(checkpoint, args.limit),
        }
        print(f"{args.model}: {n} questions x 4 options, {torch.get_num_threads()} threads, fp32 CPU, "
              f"{args.rounds} rounds after a warm-up", flush=True)
        rows = timed_rounds(passes, args.rounds)
    for name, (times, acc) in rows.items():
        seconds = statistics.median(times)
        print(f"  {name:30s} {n / seconds:7.2f} examples/s  acc {acc:.3f}  ({seconds:.1f} s a pass, "
              f"rounds {', '.join(f'{t:.1f}' for t in times)})")
    base = rows[hf_name][0]
    for name, (times, _) in rows.items():
        ratios = [b / t for b, t in zip(base, times, strict=True)]
        each = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"  speed vs hf: {name:30s} x{statistics.median(ratios):.2f} (rounds {each})")
    same = abs(rows[hf_name][1] - rows["lmforge via lm_eval"][1]) < 1e-9
    print(f"  hf and lmforge agree on lm_eval accuracy: {same}")


if __name__ == "__main__":
    main()
