"""Generative tasks with answer extraction: GSM8K-style arithmetic word problems, with chain-of-thought.

Each problem is put to the model as a chat (its chat template; plain text for a model without one): k solved
examples as earlier turns, then the question. With `cot`, the question ends with "Let's think step by step." or
"让我们一步一步地思考。" (zero-shot chain of thought) and the examples show their worked solutions; without it the
examples show only the final answers. The model answers greedily, or, with `samples` > 1, that many sampled chains
run as one batch through `Engine.generate` and the most common extracted answer wins (self-consistency).
Several problems share a batch (BATCH_ROWS sequences), since a decode step over 8 rows costs about one row's.

`extract_answer` reads the number after "####", else after "the answer is" / "答案是", else the last number in the
text; numbers compare by value ("1,000" == "1000.0").
This module does not score multiple choice (multiple_choice.py) or write reports (report.py).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.engine import Completion, Engine
from lmforge.errors import LmforgeError
from lmforge.eval.multiple_choice import language
from lmforge.eval.tasks import Task, take
from lmforge.progress import track
from lmforge.sampling import SamplingParams

COT = {"en": "Let's think step by step.", "zh": "让我们一步一步地思考。"}
ANSWER_CUE = {"en": "The answer is", "zh": "答案是"}
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(rf"####\s*\$?\s*({_NUMBER})")
_CUED = re.compile(rf"(?:answer is|答案是|答案为|答案：|答案:)\s*[:：]?\s*\$?\s*({_NUMBER})", re.IGNORECASE)
_ANY = re.compile(_NUMBER)
BATCH_ROWS = 8  # sequences decoded together


@dataclass
class Problem:
    question: str
    solution: str  # the worked answer, ending with "#### <number>"
    answer: str  # the number after ####
    lang: str
    id: str


@dataclass
class GenResult:
    n: int = 0
    correct: int = 0
    by_lang: dict[str, list[int]] = field(default_factory=dict)  # lang -> [n, correct]
    shots_reduced: int = 0  # problems whose prompt lost shots to fit the context
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        by_lang = {k: {"n": n, "acc": c / n} for k, (n, c) in sorted(self.by_lang.items())}
        acc = self.correct / self.n if self.n else 0.0
        return {"n": self.n, "acc": acc, "by_lang": by_lang, "shots_reduced": self.shots_reduced}


# --- files ---------------------------------------------------------------------------------------------------


def load(task: Task) -> tuple[list[Problem], list[Problem]]:
    """(problems, few-shot examples): examples from <stem>_dev.jsonl, else train.jsonl, beside the file."""
    problems = read_jsonl(task.path)
    for name in (f"{task.path.stem}_dev.jsonl", "train.jsonl"):
        if (task.path.parent / name).is_file() and name != task.path.name:
            return problems, read_jsonl(task.path.parent / name)
    return problems, []


def read_jsonl(path: Path) -> list[Problem]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            question, solution = str(d["question"]), str(d["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LmforgeError(f"{path}: line {n} is not a {{question, answer}} object ({e})") from None
        final = _FINAL.search(solution)
        if final is None:
            raise LmforgeError(f"{path}: line {n}: the answer has no '#### <number>' (the GSM8K layout)")
        out.append(Problem(question, solution, _normalize(final.group(1)), language(question), str(d.get("id", n))))
    if not out:
        raise LmforgeError(f"{path}: no problems in the file")
    return out


# --- answers -------------------------------------------------------------------------------------------------


def _normalize(number: str) -> str:
    value = float(number.replace(",", ""))
    return str(int(value)) if value.is_integer() else str(value)


def extract_answer(text: str) -> str | None:
    """The model's final number, normalized (see the module docstring for where it is looked for)."""
    for pattern in (_FINAL, _CUED):
        found = pattern.findall(text)
        if found:
            return _normalize(found[-1])
    numbers = _ANY.findall(text)
    return _normalize(numbers[-1]) if numbers else None


def _shown_solution(p: Problem, cot: bool) -> str:
    """An example's answer turn: the worked solution with its last line as a cue, or just the cue."""
    cue = f"{ANSWER_CUE[p.lang]} {p.answer}."
    if not cot:
        return cue
    steps = p.solution[: _FINAL.search(p.solution).start()].strip()  # type: ignore[union-attr]
    return f"{steps}\n{cue}"


def _question_turn(p: Problem, cot: bool) -> str:
    return f"{p.question}\n{COT[p.lang]}" if cot else p.question


def build_prompt(engine: Engine, p: Problem, shots: list[Problem], cot: bool) -> list[int]:
    messages = []
    for s in shots:
        messages += [
            {"role": "user", "content": _question_turn(s, cot)},
            {"role": "assistant", "content": _shown_solution(s, cot)},
        ]
    messages.append({"role": "user", "content": _question_turn(p, cot)})
    tok = engine.tokenizer
    return tok.encode(tok.render_chat(messages, add_generation_prompt=True))


def fit_prompt(engine: Engine, p: Problem, shots: list[Problem], cot: bool, room: int) -> tuple[list[int], int]:
    """The prompt with as many shots as leave `room` tokens for the answer; returns (ids, shots kept)."""
    for k in range(len(shots), -1, -1):
        ids = build_prompt(engine, p, shots[:k], cot)
        if len(ids) + room <= engine.max_len:
            return ids, k
    raise LmforgeError(
        f"problem {p.id} needs {len(ids)} prompt tokens + {room} new ones but the context is {engine.max_len}; "
        "lower --max-new-tokens"
    )


# --- evaluation ----------------------------------------------------------------------------------------------


def majority(answers: list[str | None]) -> str | None:
    """The most common answer; ties go to the one seen first. None (nothing extracted) never wins over a number."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None


def evaluate(
    engine: Engine,
    task: Task,
    shots: int = 0,
    cot: bool = False,
    samples: int = 1,
    limit: int | None = None,
    max_new_tokens: int = 256,
    progress: bool = True,
    seed: int = 0,
) -> GenResult:
    problems, dev = load(task)
    problems = take(problems, limit, lambda p: p.lang)
    greedy = samples <= 1
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else 0.7,
        top_p=1.0 if greedy else 0.95,
        seed=seed,
    )
    n = max(1, samples)
    per_batch = max(1, BATCH_ROWS // n)  # decoding is memory-bound: a batch of rows costs about what one does
    batches = [problems[i : i + per_batch] for i in range(0, len(problems), per_batch)]
    result = GenResult()
    for batch in track(batches, f"solving {task.name}", enabled=progress):
        prompts = []
        for p in batch:
            chosen = [d for d in dev if d.lang == p.lang][:shots]
            ids, kept = fit_prompt(engine, p, chosen, cot, max_new_tokens)
            result.shots_reduced += kept < len(chosen)
            prompts.append(ids)
        outs = engine.generate([ids for ids in prompts for _ in range(n)], params)
        for i, p in enumerate(batch):
            _record(result, p, outs[i * n : (i + 1) * n])
    return result


def _record(result: GenResult, p: Problem, outs: list[Completion]) -> None:
    answers = [extract_answer(o.text) for o in outs]
    pred = majority(answers)
    ok = pred == p.answer
    result.n += 1
    result.correct += ok
    tally = result.by_lang.setdefault(p.lang, [0, 0])
    tally[0], tally[1] = tally[0] + 1, tally[1] + ok
    result.predictions.append(
        {
            "id": p.id,
            "lang": p.lang,
            "answer": p.answer,
            "pred": pred,
            "correct": ok,
            "votes": answers,
            "outputs": [o.text for o in outs],
        }
    )
