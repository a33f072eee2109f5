"""`lmforge data prefs`: preference pairs from a policy's own replies, ranked without humans (ChatGLM's feedback
bootstrap).

For each prompt the policy samples K replies (K identical rows of one `Engine.generate` batch, seeded with --seed
plus the prompt's index, so a resumed run samples what an uninterrupted one would). The distinct non-empty replies
are ranked by exactly one ranker; the best becomes `chosen` and the worst `rejected` (one pair per prompt):
- a reward model (`--reward`, from `lmforge rm train`): its scalar score of each reply;
- a judge (`--judge-url` or `--judge-local`): a round robin of pairwise verdicts, every pair judged in both orders as
  `lmforge judge` does (eval/judge.py); a reply scores 1 per win and 0.5 per tie, order disagreement or unreadable
  verdict (unreadable ones are counted);
- a Python function (`--reward-fn file.py:fn`), called as TRL calls reward functions:
  `fn(prompts=[...], completions=[...], **columns) -> list[float]`, each of the prompt record's other fields given
  as a list with one entry per completion. The file is the user's own code, imported like a config.
The prompt the judge and the function see is the user's message, or a "role: content" transcript of a longer
conversation. A best or worst shared by several replies goes to the earlier sample. A prompt whose replies are all
the same (or empty), or all score equal, or that leaves no room for the replies in the policy's context, gives
no pair and is counted. Each record is appended as one line, flushed and synced, with its provenance (scores and
indices follow the distinct replies in sample order); `--resume` skips prompts the output already holds (a torn
last line is dropped).
The records are what `lmforge rm train` and `lmforge dpo` read (align/prefs.py).
It does not write more than one pair per prompt, filter pairs on their score margin, or train anything.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol

from lmforge.errors import LmforgeError
from lmforge.eval.judge import judge_pair
from lmforge.progress import step_progress
from lmforge.train.sft_data import BadRecord, parse_records, resolve_data

ROLES = ("system", "user", "assistant")
PROMPT_FIELDS = ("prompt", "messages", "instruction", "input", "system")  # what a record's prompt is made of
POINTS = {"win": 1.0, "tie": 0.5, "invalid": 0.5, "loss": 0.0}  # answer 1's share of one judged pair


@dataclass
class PrefsConfig:
    prompts: str  # .jsonl/.json (prompt, messages or instruction+input per record), .txt (one per line), builtin:NAME
    out: str  # the JSONL file records are appended to
    model: str | None = None  # the policy: catalog name, .gguf or checkpoint directory
    quant: str | None = None
    adapter: str | None = None
    k: int = 4  # replies sampled per prompt
    reward: str | None = None  # ranker: a reward model directory
    judge_url: str | None = None  # ranker: an OpenAI-compatible judge ...
    judge_model: str | None = None  # ... and the model name it expects
    judge_key: str | None = None
    judge_local: str | None = None  # ranker: a local model as judge
    judge_max_tokens: int = 512
    reward_fn: str | None = None  # ranker: file.py:function
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    limit: int | None = None  # the first N prompts only
    keep_candidates: bool = False  # also write every ranked reply into the provenance
    resume: bool = False
    overwrite: bool = False
    bad_records: str = "stop"
    progress: bool = True

    def validate(self) -> None:
        rankers = [x for x in (self.reward, self.judge_url, self.judge_local, self.reward_fn) if x]
        if len(rankers) != 1:
            raise LmforgeError("give exactly one ranker: --reward RM_DIR, --judge-url URL --judge-model NAME, "
                               "--judge-local MODEL or --reward-fn FILE.py:FUNCTION")
        if self.judge_url and not self.judge_model:
            raise LmforgeError("--judge-url needs --judge-model (the model name the server expects)")
        if self.k < 2:
            raise LmforgeError(f"--k {self.k}: a pair needs at least 2 replies per prompt")
        if self.temperature <= 0:
            raise LmforgeError("--temperature 0 samples the same reply K times; give a temperature above 0")
        if self.resume and self.overwrite:
            raise LmforgeError("--resume continues the output and --overwrite replaces it; give one")
        if self.bad_records not in ("stop", "skip"):
            raise LmforgeError(f"--bad-records {self.bad_records!r}: choose stop or skip")


# --- prompts ------------------------------------------------------------------------------------------------------


@dataclass
class PromptRecord:
    messages: list[dict[str, str]]  # what the policy is asked, system turn included
    prompt: str | list[dict[str, str]]  # what the output record's `prompt` holds: a string or the message list
    system: str | None = None  # a `system` field, carried into the output record as it came
    columns: dict[str, Any] = field(default_factory=dict)  # the record's other fields, for --reward-fn

    @property
    def key(self) -> str:
        """What --resume matches an output record on."""
        return prompt_key(self.prompt, self.system)

    @property
    def question(self) -> str:
        """The prompt as text, for a judge or a reward function."""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


def prompt_key(prompt: Any, system: Any) -> str:
    return json.dumps([prompt, system], ensure_ascii=False, sort_keys=True)


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{what} must be a non-empty list of {{role, content}} messages")
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRecord(f"{what}: every message needs a role (system, user or assistant) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _string(record: dict, key: str) -> str:
    value = record.get(key) or ""
    if not isinstance(value, str):
        raise BadRecord(f"{key} must be a string, got {type(value).__name__}")
    return value


def to_prompt(record: Any) -> PromptRecord:
    """A prompt record: `prompt` (string or messages), `messages`, or Alpaca `instruction` (+ `input`); `system`
    optional."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    if isinstance(record.get("prompt"), list) or "messages" in record:
        key = "prompt" if "prompt" in record else "messages"
        prompt: str | list[dict[str, str]] = _messages(record[key], key)
        messages = list(prompt)
    elif "prompt" in record:
        prompt = _string(record, "prompt")
        messages = [{"role": "user", "content": prompt}]
    elif "instruction" in record:  # Alpaca, joined as `lmforge sft` joins it
        prompt = "\n\n".join(part for part in (_string(record, "instruction"), _string(record, "input")) if part)
        messages = [{"role": "user", "content": prompt}]
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord(f"no prompt (keys: {keys}); give prompt, messages, or instruction (+ input)")
    system = _string(record, "system") or None
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise BadRecord("the prompt must end with a non-empty user turn")
    columns = {k: v for k, v in record.items() if k not in PROMPT_FIELDS}
    return PromptRecord(messages, prompt, system, columns)


def read_prompts(spec: str, bad_records: str, skipped: list[str]) -> list[PromptRecord]:
    path = resolve_data(spec)
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [to_prompt({"prompt": line.strip()}) for line in lines if line.strip()]
    prompts = list(parse_records([path], to_prompt, bad_records, skipped))
    if not prompts:
        raise LmforgeError(f"{spec}: no prompts")
    return prompts


# --- rankers ------------------------------------------------------------------------------------------------------


class Ranker(Protocol):
    name: str
    invalid: int  # unreadable judge verdicts (0 for the others)

    def scores(self, item: PromptRecord, replies: list[str]) -> list[float]: ...


class RewardModelRanker:
    def __init__(self, path: str) -> None:
        from lmforge.align.reward import RewardScorer

        self.scorer, self.name, self.invalid = RewardScorer(path), f"reward-model:{path}", 0

    def scores(self, item: PromptRecord, replies: list[str]) -> list[float]:
        return self.scorer.score(item.messages, replies)


class JudgeRanker:
    """Round robin: every pair of replies judged in both orders; a reply's score is its wins, ties counting half."""

    def __init__(self, ask: Callable[[str, str, str], str], name: str) -> None:
        self.ask, self.name, self.invalid = ask, name, 0

    def scores(self, item: PromptRecord, replies: list[str]) -> list[float]:
        points = [0.0] * len(replies)
        for i, j in combinations(range(len(replies)), 2):
            result = judge_pair(item.question, replies[i], replies[j], self.ask)["result"]
            self.invalid += result == "invalid"
            points[i] += POINTS[result]
            points[j] += 1.0 - POINTS[result]
        return points


class FunctionRanker:
    def __init__(self, spec: str) -> None:
        self.fn, self.name, self.invalid = load_reward_fn(spec), f"reward-fn:{spec}", 0

    def scores(self, item: PromptRecord, replies: list[str]) -> list[float]:
        n = len(replies)
        columns = {key: [value] * n for key, value in item.columns.items()}
        out = self.fn(prompts=[item.question] * n, completions=list(replies), **columns)
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError) as e:
            raise LmforgeError(f"{self.name} must return a list of numbers, got {out!r:.200}") from e
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise LmforgeError(f"{self.name} must return {n} finite numbers (one per completion), got {out!r:.200}")
        return values


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """FILE.py:FUNCTION, imported from the file's path (the user's own code, trusted as a config is)."""
    file, _, name = spec.rpartition(":")
    path = Path(file).expanduser()
    if not file or not name:
        raise LmforgeError(f"--reward-fn {spec!r}: give FILE.py:FUNCTION")
    if not path.is_file():
        raise LmforgeError(f"--reward-fn: {path}: no such file")
    module_name = f"lmforge_reward_fn_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise LmforgeError(f"--reward-fn: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so dataclasses and pickling inside the file find their module
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LmforgeError(f"--reward-fn: {path} has no function {name!r}")
    return fn


def make_ranker(cfg: PrefsConfig) -> Ranker:
    from lmforge.eval import judge

    if cfg.reward:
        return RewardModelRanker(cfg.reward)
    if cfg.reward_fn:
        return FunctionRanker(cfg.reward_fn)
    if cfg.judge_url:
        ask = judge.openai_judge(cfg.judge_url, cfg.judge_model, cfg.judge_key, cfg.judge_max_tokens)
        return JudgeRanker(ask, f"judge:{cfg.judge_model}@{cfg.judge_url}")
    from lmforge.engine import Engine
    from lmforge.loader import open_model

    loaded = open_model(cfg.judge_local)
    return JudgeRanker(judge.local_judge(Engine(loaded.model, loaded.tokenizer), cfg.judge_max_tokens),
                       f"judge-local:{cfg.judge_local}")


def best_and_worst(scores: list[float]) -> tuple[int, int] | None:
    """(index of the best, index of the worst), earlier samples winning ties; None when every score is equal."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return None if scores[best] == scores[worst] else (best, worst)


# --- the output file ----------------------------------------------------------------------------------------------


def done_prompts(out: Path) -> set[str]:
    """The prompt keys an output file already holds; a torn last line (a run killed mid-write) is cut off."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with out.open("r+b") as f:
            f.truncate(keep)
        print(f"lmforge: {out}: dropped an unfinished last record", file=sys.stderr)
        data = data[:keep]
    keys = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keys.add(prompt_key(record["prompt"], record.get("system")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LmforgeError(f"{out}:{n}: not a preference record ({e}); cannot resume this file") from None
    return keys


class Appender:
    """One JSON line per record, written in one call, flushed and synced: a crash loses at most the line in
    progress."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# --- the stage ----------------------------------------------------------------------------------------------------


def _policy_name(cfg: PrefsConfig, directory: Path) -> str:
    return " ".join([cfg.model or str(directory)] + ([f"--quant {cfg.quant}"] if cfg.quant else []) +
                    ([f"--adapter {cfg.adapter}"] if cfg.adapter else []))


def sample_replies(engine: Any, item: PromptRecord, cfg: PrefsConfig, seed: int) -> list[str] | None:
    """K replies to one prompt: K identical rows decoded together under one seeded random stream (None: the prompt
    leaves no room for --max-new-tokens in the policy's context)."""
    from lmforge.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=seed)
    tok = engine.tokenizer
    ids = tok.encode(tok.render_chat(item.messages, add_generation_prompt=True))
    if len(ids) + cfg.max_new_tokens > engine.max_len:
        return None
    return [c.text.strip() for c in engine.generate([ids] * cfg.k, params)]


def _pending(prompts: list[PromptRecord], done: set[str]) -> Iterator[tuple[int, PromptRecord]]:
    """(index in the prompts file, prompt) of each prompt not yet in the output; a repeated prompt counts as done."""
    for index, item in enumerate(prompts):
        if item.key not in done:
            done.add(item.key)
            yield index, item


def main(cfg: PrefsConfig) -> dict[str, Any]:
    from lmforge.engine import Engine
    from lmforge.loader import open_model

    cfg.validate()
    started = time.perf_counter()
    out = Path(cfg.out).expanduser()
    if out.is_file() and out.stat().st_size and not (cfg.resume or cfg.overwrite):
        raise LmforgeError(f"{out} already holds records; pass --resume to continue it or --overwrite to replace it")
    bad: list[str] = []
    prompts = read_prompts(cfg.prompts, cfg.bad_records, bad)[: cfg.limit]
    done = done_prompts(out) if cfg.resume else set()
    todo = list(_pending(prompts, done))

    loaded = open_model(cfg.model, cfg.quant, cfg.adapter)
    engine, policy = Engine(loaded.model, loaded.tokenizer), _policy_name(cfg, loaded.directory)
    ranker = make_ranker(cfg)
    skipped = {"too_long": 0, "identical": 0, "tied": 0}
    written = 0
    if cfg.overwrite:  # only now, once everything before the first record has worked
        out.unlink(missing_ok=True)
    writer = Appender(out)
    try:
        with step_progress("prefs", len(todo), enabled=cfg.progress) as update:
            for step, (index, item) in enumerate(todo, 1):
                seed = cfg.seed + index
                sampled = sample_replies(engine, item, cfg, seed)
                replies = [r for r in dict.fromkeys(sampled or []) if r]  # distinct and non-empty, in sample order
                picked = None
                if sampled is None:
                    skipped["too_long"] += 1
                elif len(replies) < 2:
                    skipped["identical"] += 1
                else:
                    scores = ranker.scores(item, replies)
                    picked = best_and_worst(scores)
                    skipped["tied"] += picked is None
                if picked is not None:
                    writer.write(_record(item, replies, scores, picked, cfg, policy, ranker.name, seed))
                    written += 1
                update(step, f"{written} pairs, {sum(skipped.values())} skipped")
    finally:
        writer.close()
    report = {"stage": "prefs", "out": str(out), "prompts": len(prompts), "already_done": len(prompts) - len(todo),
              "pairs": written, "skipped": skipped, "bad_records": len(bad), "ranker": ranker.name,
              "seconds": round(time.perf_counter() - started, 1)}
    if isinstance(ranker, JudgeRanker):
        report["invalid_verdicts"] = ranker.invalid
    return report


def _record(item: PromptRecord, replies: list[str], scores: list[float], picked: tuple[int, int], cfg: PrefsConfig,
            policy: str, ranker: str, seed: int) -> dict[str, Any]:
    best, worst = picked
    provenance: dict[str, Any] = {
        "policy": policy, "ranker": ranker, "scores": scores, "k": cfg.k, "seed": seed,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens},
        "chosen_index": best, "rejected_index": worst,
    }
    if cfg.keep_candidates:
        provenance["candidates"] = replies
    system = {"system": item.system} if item.system else {}
    return {"prompt": item.prompt, **system, "chosen": replies[best], "rejected": replies[worst],
            "provenance": provenance}


def summary_line(report: dict[str, Any]) -> str:
    why = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in report["skipped"].items() if n) or "none"
    line = (f"prefs: {report['prompts']:,} prompts, {report['pairs']:,} pairs written, "
            f"{sum(report['skipped'].values()):,} skipped ({why})")
    if report["already_done"]:
        line += f", {report['already_done']:,} already in the output"
    if report["bad_records"]:
        line += f", {report['bad_records']:,} bad records"
    if "invalid_verdicts" in report:
        line += f", {report['invalid_verdicts']:,} unreadable verdicts"
    return line + f", {report['seconds']} s -> {report['out']}"
