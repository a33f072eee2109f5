"""Multiple-choice tasks scored by log-likelihood: MMLU, C-Eval, CMMLU and a generic JSONL layout.

Each question is shown with its lettered options, in an English or Chinese template (C-Eval's wording for
Chinese), after k solved examples from the dev split. Two scores per question, as lm-evaluation-harness reports
them for its two task styles:
  acc       the option whose letter (" A", " B", ...) is most likely after "Answer:": the MMLU/C-Eval protocol
            behind published numbers;
  acc_norm  the option whose own text is most likely per UTF-8 byte (lm-eval's length-normalized accuracy), which
            does not depend on the model having learned the letter format.
All continuations of one question are scored in one forward: the prompt runs once into a KV cache that every
option's row then shares (`score_continuations`). A prompt too long for the context loses shots, one at a time,
and the result counts the questions that did.

This module does not generate text (generative.py does) or write reports (report.py does).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.eval.tasks import Task
from lmforge.model import KVCache, Positions, Transformer
from lmforge.progress import track
from lmforge.tokenizer import Tokenizer

LETTERS = "ABCDEFGHIJ"
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: int  # index into choices
    subject: str = ""
    lang: str = "en"  # picks the prompt template
    id: str = ""


@dataclass(frozen=True)
class Template:
    header: str  # "{subject}" is filled in
    answer: str  # the cue after the options
    sep: str  # between the cue and the answer


TEMPLATES = {
    "en": Template("The following are multiple choice questions (with answers) about {subject}.\n\n", "Answer:", " "),
    "zh": Template("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案：", ""),
}


def language(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


# --- reading the layouts -------------------------------------------------------------------------------------


def load(task: Task) -> tuple[list[Question], list[Question]]:
    """(questions to score, dev examples for shots) of an mmlu / ceval / cmmlu / mc task."""
    if task.kind == "mc":
        dev_path = task.path.with_name(f"{task.path.stem}_dev.jsonl")
        return _read_jsonl(task.path), _read_jsonl(dev_path) if dev_path.is_file() else []
    splits = {"mmlu": ("test", "_test", "dev", "_dev"), "ceval": ("val", "_val", "dev", "_dev")}
    test_dir, test_suffix, dev_dir, dev_suffix = splits.get(task.kind, ("test", "", "dev", ""))
    files = sorted((task.path / test_dir).glob(f"*{test_suffix}.csv"))
    if not files:
        raise LmforgeError(
            f"{task.path}: no {test_dir}/<subject>{test_suffix}.csv files; is this a {task.kind} directory?"
        )
    questions: list[Question] = []
    dev: list[Question] = []
    for path in files:
        subject = path.stem.removesuffix(test_suffix)
        questions += _read_csv(path, subject, task.kind)
        dev_path = task.path / dev_dir / f"{subject}{dev_suffix}.csv"
        if dev_path.is_file():
            dev += _read_csv(dev_path, subject, task.kind)
    return questions, dev


def _read_csv(path: Path, subject: str, kind: str) -> list[Question]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    lang = "en" if kind == "mmlu" else "zh"
    if kind == "mmlu":  # no header: question, A, B, C, D, answer
        columns, body, first_row = [0, 1, 2, 3, 4, 5], rows, 1
    else:
        header = [h.strip().lower() for h in rows[0]] if rows else []
        wanted = ["question", "a", "b", "c", "d", "answer"]
        missing = [w for w in wanted if w not in header]
        if missing:
            raise LmforgeError(f"{path}: the header has no column {missing[0]!r} (need question, A, B, C, D, answer)")
        columns, body, first_row = [header.index(w) for w in wanted], rows[1:], 2
    out = []
    for n, row in enumerate(body, start=first_row):
        if len(row) <= max(columns):
            raise LmforgeError(f"{path}: row {n} has {len(row)} columns; need question, A, B, C, D, answer")
        q, *choices, answer = (row[c].strip() for c in columns)
        out.append(Question(q, choices, _answer_index(answer, len(choices), path, n), subject, lang, f"{subject}/{n}"))
    return out


def _read_jsonl(path: Path) -> list[Question]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            q, choices = str(d["question"]), [str(c) for c in d["choices"]]
            answer = d["answer"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LmforgeError(f"{path}: line {n} is not a {{question, choices, answer}} object ({e})") from None
        if len(choices) < 2:
            raise LmforgeError(f"{path}: line {n} has {len(choices)} choices; a question needs at least two")
        index = answer if isinstance(answer, int) else _answer_index(str(answer), len(choices), path, n)
        if not 0 <= index < len(choices):
            raise LmforgeError(f"{path}: line {n}: answer index {index} is out of range")
        lang = d.get("lang") or language(q)
        out.append(Question(q, choices, index, str(d.get("subject", "")), lang, str(d.get("id", n))))
    if not out:
        raise LmforgeError(f"{path}: no questions in the file")
    return out


def _answer_index(answer: str, n_choices: int, path: Path, row: int) -> int:
    letter = answer.strip().upper()
    if len(letter) != 1 or letter not in LETTERS[:n_choices]:
        raise LmforgeError(f"{path}: row {row}: answer {answer!r} is not one of {', '.join(LETTERS[:n_choices])}")
    return LETTERS.index(letter)


# --- prompts -------------------------------------------------------------------------------------------------


def format_question(q: Question, solved: bool) -> str:
    t = TEMPLATES[q.lang]
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=False))
    text = f"{q.question}{options}\n{t.answer}"
    return text + f"{t.sep}{LETTERS[q.answer]}\n\n" if solved else text


def build_prompt(q: Question, shots: list[Question]) -> str:
    subject = q.subject.replace("_", " ") or ("general knowledge" if q.lang == "en" else "常识")
    header = TEMPLATES[q.lang].header.format(subject=subject)
    return header + "".join(format_question(s, solved=True) for s in shots) + format_question(q, solved=False)


def pick_shots(q: Question, dev: list[Question], k: int) -> list[Question]:
    """The first k dev examples of the question's subject (else of its language), never the question itself."""
    same = [d for d in dev if d.subject == q.subject and d.question != q.question] if q.subject else []
    if len(same) < k:
        same += [d for d in dev if d.lang == q.lang and d not in same and d.question != q.question]
    return same[:k]


# --- scoring -------------------------------------------------------------------------------------------------


@torch.inference_mode()
def score_continuations(model: Transformer, prefix: list[int], continuations: list[list[int]]) -> list[float]:
    """Log-likelihood (nats) of each continuation after `prefix`, in one forward that shares the prefix."""
    return [logp for logp, _ in score_greedy(model, prefix, continuations)]


def score_greedy(model: Transformer, prefix: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
    """(log-likelihood, whether greedy decoding would produce it) of each continuation after `prefix`.

    The prefix runs once into a one-row cache; the cache is copied to one row per continuation, and the
    continuations (right-padded; padding comes after each row's real tokens, so no real token sees it) run
    together at the positions after the prefix.
    """
    device = next(model.parameters()).device
    p, t = len(prefix), max(len(c) for c in continuations)
    # A P-Tuning prefix (model.prefix_len slots) sits in the cache before the first token.
    cache = KVCache.allocate(model.cfg, 1, model.prefix_len + p + t, next(model.parameters()).dtype, device)
    first = model(torch.tensor([prefix], device=device), Positions.make(torch.arange(p, device=device)), cache, keep=-1)
    rows = len(continuations)
    shared = KVCache(*([buf.expand(rows, -1, -1, -1).clone() for buf in bufs] for bufs in (cache.k, cache.v)))
    x = torch.tensor([c + [c[-1]] * (t - len(c)) for c in continuations], device=device)  # (B, T)
    logits = model(x, Positions.make(torch.arange(p, p + t, device=device)), shared)  # (B, T, V)
    # Token j of a continuation is predicted by position j - 1; token 0 by the prefix's last position.
    logits = torch.cat([first.expand(rows, -1, -1), logits[:, :-1]], dim=1).float()
    logp = F.log_softmax(logits, dim=-1).gather(-1, x[..., None])[..., 0]  # (B, T)
    greedy = logits.argmax(-1) == x  # (B, T)
    return [(logp[i, : len(c)].sum().item(), bool(greedy[i, : len(c)].all())) for i, c in enumerate(continuations)]


@dataclass
class Tally:
    n: int = 0
    acc: int = 0
    acc_norm: int = 0

    def metrics(self) -> dict[str, Any]:
        n = max(1, self.n)
        return {"n": self.n, "acc": self.acc / n, "acc_norm": self.acc_norm / n}


@dataclass
class McResult:
    overall: Tally = field(default_factory=Tally)
    by_lang: dict[str, Tally] = field(default_factory=dict)
    shots_reduced: int = 0
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        out = self.overall.metrics()
        out["by_lang"] = {lang: t.metrics() for lang, t in sorted(self.by_lang.items())}
        out["shots_reduced"] = self.shots_reduced
        return out


def fit_prompt(tok: Tokenizer, q: Question, shots: list[Question], room: int) -> tuple[list[int], int]:
    """Prompt ids within `room` tokens, dropping shots from the end as needed; returns (ids, shots kept)."""
    for k in range(len(shots), -1, -1):
        ids = tok.encode(build_prompt(q, shots[:k]))
        if len(ids) <= room:
            return ids, k
    return ids[-room:], 0  # even zero-shot is too long: keep the end, where the question and options are


def evaluate(
    model: Transformer, tok: Tokenizer, task: Task, shots: int = 0, limit: int | None = None, progress: bool = True
) -> McResult:
    questions, dev = load(task)
    questions = questions[:limit] if limit else questions
    result = McResult()
    longest_option = 64  # tokens reserved for the continuations
    for q in track(questions, f"scoring {task.name}", enabled=progress):
        chosen = pick_shots(q, dev, shots)
        prefix, kept = fit_prompt(tok, q, chosen, model.cfg.max_seq_len - longest_option)
        result.shots_reduced += kept < len(chosen)
        sep = TEMPLATES[q.lang].sep
        letters = [tok.encode(sep + LETTERS[i], add_bos=False) for i in range(len(q.choices))]
        texts = [tok.encode(sep + c, add_bos=False)[:longest_option] for c in q.choices]
        scores = score_continuations(model, prefix, letters + texts)
        by_letter, by_text = scores[: len(q.choices)], scores[len(q.choices) :]
        per_byte = [s / max(1, len((sep + c).encode("utf-8"))) for s, c in zip(by_text, q.choices, strict=True)]
        pred, pred_norm = _argmax(by_letter), _argmax(per_byte)
        for tally in (result.overall, result.by_lang.setdefault(q.lang, Tally())):
            tally.n += 1
            tally.acc += pred == q.answer
            tally.acc_norm += pred_norm == q.answer
        result.predictions.append(
            {
                "id": q.id,
                "subject": q.subject,
                "lang": q.lang,
                "answer": LETTERS[q.answer],
                "pred": LETTERS[pred],
                "pred_norm": LETTERS[pred_norm],
                "loglik_letter": [round(s, 4) for s in by_letter],
                "loglik_text": [round(s, 4) for s in by_text],
                "shots": kept,
            }
        )
    return result


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
