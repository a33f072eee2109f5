"""Multiple-choice tasks scored by log-likelihood: MMLU, C-Eval, CMMLU and a generic JSONL layout.

Each question is shown with its lettered options, in an English or Chinese template (C-Eval's wording for
Chinese), after k solved examples from the dev split. Two scores per question, as lm-evaluation-harness reports
them for its two task styles:
  acc       the option whose letter (" A", " B", ...) is most likely after "Answer:": the MMLU/C-Eval protocol
            behind published numbers;
  acc_norm  the option whose own text is most likely per UTF-8 byte (lm-eval's length-normalized accuracy), which
            does not depend on the model having learned the letter format.
Scoring (`score_groups`) runs each prompt once into a KV cache that every option's row then shares, and packs
several questions into each forward (prompts right-padded, per-row positions), since a CPU matmul over one
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
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.eval.tasks import Task, take
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


Group = tuple[list[int], list[list[int]]]  # (prefix ids, its continuations' ids)
ROW_BUDGET = 512  # most padded token rows per forward: bounds the activations and the copied cache rows
# What one more forward costs, in token rows: a CPU product [M, 576] x [576, 1536] costs about 11 rows' worth more
# than M rows' worth, whatever M (measured here, one thread), plus the forward's small ops.
FORWARD_COST = 16


def score_continuations(model: Transformer, prefix: list[int], continuations: list[list[int]]) -> list[float]:
    """Log-likelihood (nats) of each continuation after `prefix`, in one forward that shares the prefix."""
    return [logp for logp, _ in score_groups(model, [(prefix, continuations)])[0]]


@torch.inference_mode()
def score_groups(model: Transformer, groups: list[Group], budget: int = ROW_BUDGET) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, greedy?) of every continuation of every group, several groups to a forward.

    Groups are sorted longest prefix first and cut into packs (`batches`); each pack's continuations are then
    batched the same way. Results are those of each group scored alone: padding never reaches a real token.
    """
    order = sorted(range(len(groups)), key=lambda i: -len(groups[i][0]))
    out: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for begin, end in batches([len(groups[i][0]) for i in order], budget):
        _score_pack(model, groups, order[begin:end], out, budget)
    return out


def batches(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Cut rows of these lengths (longest first) into runs [begin, end) that each become one padded forward.

    The cut minimizes padded rows plus FORWARD_COST per forward (dynamic programming over run ends), with each
    run's padded rows within `budget` unless one row alone exceeds it: a few long options then do not pad many
    short ones to their length, and short prompts still share forwards.
    """
    best = [0.0] + [float("inf")] * len(lengths)  # best[j]: cost of the first j rows
    start = [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for begin in range(end - 1, -1, -1):
            if end - begin > 1 and (end - begin) * lengths[begin] > budget:
                break  # longer runs from further back only get wider
            cost = best[begin] + (end - begin) * lengths[begin] + FORWARD_COST
            if cost < best[end]:
                best[end], start[end] = cost, begin
    cuts, end = [], len(lengths)
    while end:
        cuts.append((start[end], end))
        end = start[end]
    return cuts[::-1]


def _score_pack(
    model: Transformer, groups: list[Group], pack: list[int], out: list[list[tuple[float, bool]]], budget: int
) -> None:
    """Score the groups `pack` names into `out`.

    1. One forward: the prefixes, right-padded, into a cache of one row per group; each row's last real position
       gives the logits of every continuation's first token.
    2. Every continuation of two or more tokens gets a copy of its group's cache row, and its tokens but the last
       (whose output predicts nothing) run at the positions after its prefix (`_score_tails`).
    Padding sits after each row's real tokens, so no real query attends to it (causal mask and per-row positions).
    """
    param = next(model.parameters())
    prefixes = [groups[i][0] for i in pack]
    lengths = torch.tensor([len(p) for p in prefixes], device=param.device)
    p_max = max(len(p) for p in prefixes)
    u_max = max(len(c) - 1 for i in pack for c in groups[i][1])
    cache = KVCache.allocate(model.cfg, len(pack), model.prefix_len + p_max + u_max, param.dtype, param.device)
    ids = _padded(prefixes, p_max, param.device)  # (G, P)
    first = model(ids, Positions.make(torch.arange(p_max, device=param.device)), cache, keep=lengths - 1)
    first = first[:, 0].float()  # (G, V)
    first_logp, first_best = first.log_softmax(-1), first.argmax(-1)  # (G, V), (G,)
    tails = [(g, j, c) for g, i in enumerate(pack) for j, c in enumerate(groups[i][1]) if len(c) > 1]
    rest = _score_tails(model, cache, lengths, tails, budget)
    for g, i in enumerate(pack):
        scores = []
        for j, c in enumerate(groups[i][1]):
            logp, greedy = first_logp[g, c[0]].item(), int(first_best[g]) == c[0]
            if (g, j) in rest:
                logp, greedy = logp + rest[g, j][0], greedy and rest[g, j][1]
            scores.append((logp, greedy))
        out[i] = scores


def _score_tails(
    model: Transformer, cache: KVCache, lengths: Tensor, tails: list[tuple[int, int, list[int]]], budget: int
) -> dict[tuple[int, int], tuple[float, bool]]:
    """(log-likelihood, greedy?) of tokens 1.. of each (cache row g, option j, ids) in `tails`, keyed by (g, j).

    Rows run longest first, cut into forwards by `batches`, so that short options do not pad to the longest one
    (option lengths vary far more than prompt lengths do).
    """
    device = lengths.device
    tails = sorted(tails, key=lambda t: -len(t[2]))
    out: dict[tuple[int, int], tuple[float, bool]] = {}
    for begin, end in batches([len(c) - 1 for _, _, c in tails], budget):
        batch = tails[begin:end]
        u = len(batch[0][2]) - 1  # the longest in this batch
        owner = torch.tensor([g for g, _, _ in batch], device=device)  # (R,)
        shared = KVCache([k.index_select(0, owner) for k in cache.k], [v.index_select(0, owner) for v in cache.v])
        x = _padded([c[:-1] for _, _, c in batch], u, device)  # (R, U)
        pos = lengths[owner][:, None] + torch.arange(u, device=device)  # (R, U): right after each row's prefix
        n_real = torch.tensor([len(c) - 1 for _, _, c in batch], device=device)
        real = torch.arange(u, device=device) < n_real[:, None]  # (R, U)
        logits = model(x, Positions.make(pos), shared, keep=real).float()  # (N, V): real positions, row-major
        targets = torch.tensor([t for _, _, c in batch for t in c[1:]], device=device)  # (N,)
        logp = logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)
        greedy = logits.argmax(-1) == targets
        for (g, j, _), lp, gr in zip(batch, logp.split(n_real.tolist()), greedy.split(n_real.tolist()), strict=True):
            out[g, j] = lp.sum().item(), bool(gr.all())
    return out


def _padded(rows: list[list[int]], width: int, device: torch.device) -> Tensor:
    """(len(rows), width) ids, each row right-padded with its own last token (any id would do: never attended)."""
    return torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=device)


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


CHUNK = 32
LONGEST_OPTION = 64  # tokens reserved for the continuations


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
