"""Multiple-choice tasks scored by log-likelihood: MMLU, C-Eval, CMMLU and a generic JSONL layout.

Each question is shown with its lettered options, in an English or Chinese template (C-Eval's wording for
Chinese), after k solved examples from the dev split. Two scores per question, as lm-evaluation-harness reports
them for its two task styles:
  acc       the option whose letter (" A", " B", ...) is most likely after "Answer:": the MMLU/C-Eval protocol
            behind published numbers;
  acc_norm  the option whose own text is most likely per UTF-8 byte (lm-eval's length-normalized accuracy), which
            does not depend on the model having learned the letter format.
Scoring (`score_groups`) runs each prompt once, with every option after it in the same row under a mask that
keeps options from seeing each other, and packs several questions into each row, since a CPU matmul over one
prompt's ~60 token rows runs far below the rate it reaches at a few hundred. A prompt too long for the context
loses shots, one at a time, and the result counts the questions that did.

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

from lmforge.errors import LmforgeError
from lmforge.eval.tasks import Task, take
from lmforge.model import Positions, Transformer
from lmforge.progress import track
from lmforge.tokenizer import Tokenizer

LETTERS = "ABCDEFGHIJ"
CHUNK = 32  # questions scored per call of score_groups
LONGEST_OPTION = 64  # tokens reserved for the continuations
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


Group = tuple[list[int], list[list[int]]]  # (prefix ids, its continuations' ids)
Scores = list[list[tuple[float, bool]]]  # (log-likelihood, greedy?) of each continuation of each group
ROW_BUDGET = 512  # token rows per forward: a CPU matmul runs near its best rate from a few hundred rows


def score_continuations(model: Transformer, prefix: list[int], continuations: list[list[int]]) -> list[float]:
    """Log-likelihood (nats) of each continuation after `prefix`, in one forward that shares the prefix."""
    return [logp for logp, _ in score_groups(model, [(prefix, continuations)])[0]]


@torch.inference_mode()
def score_groups(model: Transformer, groups: list[Group], budget: int = ROW_BUDGET) -> Scores:
    """(log-likelihood, greedy?) of every continuation of every group, several groups to a forward.

    Each group is laid out as one run of tokens, its prefix and then every continuation but its last token (whose
    output predicts nothing), and runs are packed into rows of about `budget` tokens (`packs`). One forward per
    row, no padding and no cache: a mask lets a prefix token see its own prefix causally, and a continuation token
    its group's prefix and its own continuation causally, each at the positions it would have alone. Results are
    those of each group scored alone, up to float summation order.
    """
    out: Scores = [[] for _ in groups]
    sizes = [len(prefix) + sum(len(c) - 1 for c in conts) for prefix, conts in groups]
    for members in packs(sizes, budget):
        _score_row(model, groups, members, out)
    return out


def packs(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of runs of these sizes, first-fit decreasing into bins of `budget` (a bigger run gets its own)."""
    bins: list[tuple[int, list[int]]] = []  # (room left, members)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        slot = next((b for b, (room, _) in enumerate(bins) if room >= sizes[i]), None)
        if slot is None:
            bins.append((budget - sizes[i], [i]))
        else:
            room, members = bins[slot]
            bins[slot] = (room - sizes[i], [*members, i])
    return [members for _, members in bins]


def _score_row(model: Transformer, groups: list[Group], members: list[int], out: Scores) -> None:
    """Score the groups `members` names, laid out in one row, into `out`."""
    device = next(model.parameters()).device
    ids: list[int] = []
    rope: list[int] = []
    seq: list[int] = []  # per token: its group's index in the row
    part: list[int] = []  # per token: -1 in a prefix, else a continuation number unique in the row
    keep: list[int] = []  # the tokens whose logits are read
    reads: list[tuple[int, int]] = []  # per scored token: (index into keep, target id), continuation by continuation
    lengths: list[int] = []  # scored tokens per continuation (= its length)
    for g, i in enumerate(members):
        prefix, conts = groups[i]
        ids += prefix
        rope += range(len(prefix))
        seq += [g] * len(prefix)
        part += [-1] * len(prefix)
        keep.append(len(ids) - 1)
        last = len(keep) - 1  # the prefix's last token predicts every continuation's first
        for c in conts:
            n = len(lengths)
            reads.append((last, c[0]))
            for j, (token, target) in enumerate(zip(c[:-1], c[1:], strict=True)):
                reads.append((len(keep), target))
                keep.append(len(ids))
                ids.append(token)
                rope.append(len(prefix) + j)
                seq.append(g)
                part.append(n)
            lengths.append(len(c))
    seq_t, part_t = torch.tensor(seq, device=device), torch.tensor(part, device=device)
    index = torch.arange(len(ids), device=device)
    mask = (
        (seq_t[:, None] == seq_t[None, :])
        & (index[None, :] <= index[:, None])
        & ((part_t[None, :] == -1) | (part_t[None, :] == part_t[:, None]))
    )
    at = Positions.packed(torch.tensor(rope, device=device), mask)
    x = torch.tensor([ids], device=device)
    logits = model(x, at, None, keep=torch.tensor([keep], device=device))[0].float()  # (K, V)
    rows = torch.tensor([r for r, _ in reads], device=device)
    targets = torch.tensor([t for _, t in reads], device=device)
    logp = logits[rows, targets] - logits.logsumexp(-1)[rows]
    greedy = logits.argmax(-1)[rows] == targets
    scores = iter(zip(logp.split(lengths), greedy.split(lengths), strict=True))
    for i in members:
        out[i] = [(lp.sum().item(), bool(gr.all())) for lp, gr in (next(scores) for _ in groups[i][1])]


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
    questions = take(questions, limit, lambda q: q.lang)
    result = McResult()
    # Questions are scored CHUNK at a time: enough for score_groups to fill its packs, few enough for progress.
    chunks = [questions[i : i + CHUNK] for i in range(0, len(questions), CHUNK)]
    for chunk in track(chunks, f"scoring {task.name}", enabled=progress):
        groups = [_group(model, tok, q, dev, shots, result) for q in chunk]
        scores = score_groups(model, [(prefix, conts) for prefix, conts, _ in groups])
        for q, (_, _, kept), s in zip(chunk, groups, scores, strict=True):
            _record(result, q, [logp for logp, _ in s], kept)
    return result


def _group(
    model: Transformer, tok: Tokenizer, q: Question, dev: list[Question], shots: int, result: McResult
) -> tuple[list[int], list[list[int]], int]:
    """(prompt ids, continuation ids: the option letters then the option texts, shots kept) of one question."""
    chosen = pick_shots(q, dev, shots)
    prefix, kept = fit_prompt(tok, q, chosen, model.cfg.max_seq_len - LONGEST_OPTION)
    result.shots_reduced += kept < len(chosen)
    sep = TEMPLATES[q.lang].sep
    letters = [tok.encode(sep + LETTERS[i], add_bos=False) for i in range(len(q.choices))]
    texts = [tok.encode(sep + c, add_bos=False)[:LONGEST_OPTION] for c in q.choices]
    return prefix, letters + texts, kept


def _record(result: McResult, q: Question, scores: list[float], kept: int) -> None:
    by_letter, by_text = scores[: len(q.choices)], scores[len(q.choices) :]
    sep = TEMPLATES[q.lang].sep
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


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
