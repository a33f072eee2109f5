"""Pairwise model-as-judge comparison (`lmforge judge`), with position swapping.

Two contenders (models, or one model in two settings: fp32 vs int4, base vs adapter) answer the same prompts; a
judge reads each question with both answers and names the better one. Judges prefer whichever answer they see first
(or second), so every pair is judged twice, once in each order: a verdict counts only when both orders agree,
a disagreement is a tie (the judge's position bias, cancelled), and a reply without a readable verdict is counted
as invalid and reported, never guessed. The judge is any model behind an OpenAI-compatible API (the `openai`
client: `lmforge serve`, vLLM, a hosted model) or a local lmforge model.
It does not score single answers on a scale, and it does not decide which judge to trust.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.fileio import write_json, write_text

SHIPPED_PROMPTS = Path(__file__).resolve().parent.parent / "datasets" / "judge_prompts.jsonl"

JUDGE_SYSTEM = (
    "You are an impartial judge. Compare the two assistant answers to the user's question for helpfulness, "
    "correctness and clarity; answer length and position must not sway you. Explain briefly, then give your verdict "
    'on the last line exactly as "[[A]]" if A is better, "[[B]]" if B is better, or "[[C]]" for a tie. '
    "The question may be in Chinese or English; judge in either."
)
VERDICT = re.compile(r"\[\[([ABC])\]\]")

Verdict = str | None  # "A", "B", "C" (tie) or None (unreadable)
JudgeFn = Callable[[str, str, str], str]  # (question, answer shown as A, answer shown as B) -> the judge's reply


def judge_prompt(question: str, answer_a: str, answer_b: str) -> str:
    return (
        f"[User Question]\n{question}\n\n"
        f"[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
        f"[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
    )


def parse_verdict(reply: str) -> Verdict:
    """The last [[A]]/[[B]]/[[C]] in the reply (judges reason first, then decide), or None."""
    found = VERDICT.findall(reply or "")
    return found[-1] if found else None


def combine(first: Verdict, swapped: Verdict) -> str:
    """Contender 1's result from the verdicts with 1 shown as A (first) and as B (swapped)."""
    if first is None or swapped is None:
        return "invalid"
    one = {"A": "win", "B": "loss", "C": "tie"}[first]
    two = {"A": "loss", "B": "win", "C": "tie"}[swapped]
    return one if one == two else "tie"  # disagreement between the orders is position bias: no winner


@dataclass
class Comparison:
    records: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {"win": 0, "tie": 0, "loss": 0, "invalid": 0}
        for r in self.records:
            out[r["result"]] += 1
        return out

    def metrics(self) -> dict[str, Any]:
        c = self.counts()
        valid = c["win"] + c["tie"] + c["loss"]
        # Ties count half, as in Chatbot Arena's and AlpacaEval's win rates.
        rate = (c["win"] + 0.5 * c["tie"]) / valid if valid else None
        swaps = sum(r["verdicts"][0] is not None and r["verdicts"][1] is not None for r in self.records)
        flipped = sum(r["result"] == "tie" and r["verdicts"] != ["C", "C"] for r in self.records)
        return {**c, "prompts": len(self.records), "win_rate": rate,
                "position_inconsistent": flipped, "position_inconsistent_rate": flipped / swaps if swaps else None}


def judge_pair(question: str, answer_1: str, answer_2: str, judge: JudgeFn) -> dict[str, Any]:
    """One pair judged in both orders: the judge's replies, their verdicts and answer 1's combined result."""
    replies = [judge(question, answer_1, answer_2), judge(question, answer_2, answer_1)]
    verdicts = [parse_verdict(r) for r in replies]
    return {"question": question, "answer_1": answer_1, "answer_2": answer_2, "verdicts": verdicts,
            "replies": replies, "result": combine(*verdicts)}


def compare(questions: list[str], answers_1: list[str], answers_2: list[str], judge: JudgeFn) -> Comparison:
    if not len(questions) == len(answers_1) == len(answers_2):
        raise LmforgeError("judge: every question needs one answer from each contender")
    pairs = zip(questions, answers_1, answers_2, strict=True)
    return Comparison([judge_pair(q, a1, a2, judge) for q, a1, a2 in pairs])


def openai_judge(base_url: str, model: str, api_key: str | None = None, max_tokens: int = 512) -> JudgeFn:
    """A judge behind an OpenAI-compatible endpoint, asked greedily so its verdicts are repeatable."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=1)

    def ask(question: str, answer_a: str, answer_b: str) -> str:
        reply = client.chat.completions.create(
            model=model, temperature=0.0, max_tokens=max_tokens,
            messages=[{"role": "system", "content": JUDGE_SYSTEM},
                      {"role": "user", "content": judge_prompt(question, answer_a, answer_b)}],
        )
        return reply.choices[0].message.content or ""

    return ask


def local_judge(engine: Any, max_new_tokens: int = 512) -> JudgeFn:
    """An lmforge model as the judge, greedy."""
    from lmforge.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def ask(question: str, answer_a: str, answer_b: str) -> str:
        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": judge_prompt(question, answer_a, answer_b)}]
        ids = engine.tokenizer.encode(engine.tokenizer.render_chat(messages, add_generation_prompt=True))
        return engine.generate([ids], params)[0].text

    return ask


def read_prompts(path: Path | None) -> list[str]:
    """Questions from a JSONL file with a `prompt` field per line (default: the shipped bilingual set)."""
    path = Path(path) if path else SHIPPED_PROMPTS
    if not path.is_file():
        raise LmforgeError(f"{path}: no such prompts file (JSONL, one {{\"prompt\": ...}} per line)")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LmforgeError(f"{path}:{n}: expected a JSON object with a \"prompt\" field ({e})") from e
        prompts.append(str(prompt))
    if not prompts:
        raise LmforgeError(f"{path}: no prompts")
    return prompts


def answer(engine: Any, questions: list[str], max_new_tokens: int, batch: int = 8) -> list[str]:
    """Greedy chat answers from one contender, a batch of rows per decode."""
    from lmforge.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    tok, out = engine.tokenizer, []
    for i in range(0, len(questions), batch):
        ids = [tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in questions[i : i + batch]]
        out += [c.text.strip() for c in engine.generate(ids, params)]
    return out


def write_results(out: Path, names: tuple[str, str], judge_name: str, comparison: Comparison) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    metrics = comparison.metrics()
    results = {"contender_1": names[0], "contender_2": names[1], "judge": judge_name, **metrics}
    write_json(out / "judge_results.json", results)
    write_text(out / "judgments.jsonl",
               "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in comparison.records))
    rate = "n/a" if metrics["win_rate"] is None else f"{metrics['win_rate']:.1%}"
    write_text(out / "judge_report.md", "\n".join([
        f"# {names[0]} vs {names[1]}, judged by {judge_name}", "",
        "Each pair was judged in both orders; a verdict counts only when both orders agree.", "",
        "| win | tie | loss | invalid | win rate of 1 (ties half) | order-inconsistent verdicts |",
        "|---|---|---|---|---|---|",
        f"| {metrics['win']} | {metrics['tie']} | {metrics['loss']} | {metrics['invalid']} | {rate} "
        f"| {metrics['position_inconsistent']} |", ""]))
    return results
