"""`lmforge speedrun --preset cpu-tiny|ci-micro|gpu-small`: corpus to chat-able model in one command.

One stage per line, each the same `lmforge` command a user would type: this module writes their command lines
(`commands`) and the CLI, which sits above it, runs them, so the speedrun is exactly the documented path and no
stage imports it. Synthetic bilingual stories (offline) → clean → dedup → tokenizer → token shards → pretrain → a
short chat-format SFT (full fine-tuning on the shipped self-cognition set); then `finish` samples generations in
English and Chinese and writes REPORT.md with the loss curve, the numbers and the lineage.
Presets differ only in sizes and steps; `cpu-tiny` is sized for ~15 minutes on 2 CPU cores, `ci-micro` for CI.
It does not add stages of its own: anything it does, a user can do with the commands it prints.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fileio import write_text


@dataclass(frozen=True)
class SpeedrunPreset:
    docs: int
    vocab_size: int
    model: str  # a PRESETS name; its vocabulary becomes the tokenizer's
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    sft_steps: int
    workers: int = 0  # processes for clean and dedup; 0 = all cores


PRESETS = {
    "ci-micro": SpeedrunPreset(docs=300, vocab_size=800, model="llama-tiny", seq_len=64, batch_size=8, steps=40,
                               lr=3e-3, sft_steps=4, workers=1),
    "cpu-tiny": SpeedrunPreset(docs=20000, vocab_size=4096, model="llama-5m", seq_len=256, batch_size=8, steps=300,
                               lr=2e-3, sft_steps=150),
    "gpu-small": SpeedrunPreset(docs=200000, vocab_size=8192, model="llama-42m", seq_len=512, batch_size=32,
                                steps=3000, lr=1e-3, sft_steps=300),
}
PROMPTS = ["Once upon a time", "从前，有一只"]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers: on a shared machine it says what a quiet one would take."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN)))


@contextlib.contextmanager
def timed(label: str, log: list[tuple[str, float, float]]) -> Iterator[None]:
    """Record `label` with its wall and CPU seconds in `log` (the report's stage table) when the block succeeds."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    yield
    log.append((label, time.perf_counter() - t0, _cpu_seconds() - c0))


def _samples(model_dir: Path, chat: bool, max_new_tokens: int = 40) -> list[tuple[str, str]]:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.engine import Engine
    from lmforge.sampling import SamplingParams

    model, tok = load_checkpoint(model_dir)
    engine = Engine(model, tok)
    texts = [tok.render_chat([{"role": "user", "content": p}], add_generation_prompt=True) if chat else p
             for p in (["Who are you?", "你是谁？"] if chat else PROMPTS)]
    done = engine.generate([tok.encode(t) for t in texts], SamplingParams(max_new_tokens=max_new_tokens))
    return [(t, c.text) for t, c in zip(texts, done, strict=True)]


def commands(preset: str, out: Path, progress: bool = True) -> list[list[str]]:
    """The argv of every stage's `lmforge` command, in order, all writing under `out` (which must be new)."""
    if preset not in PRESETS:
        raise LmforgeError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    p, out = PRESETS[preset], Path(out)
    if out.exists() and any(out.iterdir()):
        raise LmforgeError(f"{out} is not empty; choose a new --out directory for the speedrun")
    quiet = [] if progress else ["--no-progress"]
    workers = ["--workers", str(p.workers)] if p.workers else []
    return [
        ["data", "synth", "--docs", str(p.docs), "--out", str(out / "synth")],
        ["data", "clean", "--input", str(out / "synth"), "--out", str(out / "clean"), *workers],
        ["data", "dedup", "--input", str(out / "clean"), "--out", str(out / "dedup"), *workers],
        ["tokenizer", "train", "--data", str(out / "dedup"), "--vocab-size", str(p.vocab_size),
         "--out", str(out / "tokenizer")],
        ["data", "tokenize", "--input", str(out / "dedup"), "--tokenizer", str(out / "tokenizer"),
         "--out", str(out / "shards")],
        ["pretrain", "--shards", str(out / "shards"), "--tokenizer", str(out / "tokenizer"), "--out",
         str(out / "pretrain"), "--preset", p.model, "--seq-len", str(p.seq_len), "--batch-size", str(p.batch_size),
         "--max-steps", str(p.steps), "--lr", str(p.lr), "--warmup-steps", str(max(1, p.steps // 20)),
         "--eval-every", str(max(1, p.steps // 5)), "--save-every", str(max(1, p.steps // 5)),
         "--val-windows", "16", *quiet],
        ["sft", "--model", str(out / "pretrain" / "model"), "--method", "full", "--data", "builtin:self-cognition",
         "--out", str(out / "sft"), "--max-steps", str(p.sft_steps), "--lr", "1e-3", "--max-len",
         str(p.seq_len), "--eval-every", str(p.sft_steps), "--save-every", str(p.sft_steps)],
    ]


def finish(preset: str, out: Path, log: list[tuple[str, float, float]]) -> Path:
    """After the stages in `log` ran: greedy samples from both models, then REPORT.md; returns its path."""
    out = Path(out)
    with timed("samples (greedy, in-process)", log):
        samples = {heading: _samples(directory, chat) for heading, directory, chat in
                   (("pretrained", out / "pretrain" / "model", False), ("after SFT", out / "sft" / "model", True))}
    upto_pretrain = next(i for i, (c, _, _) in enumerate(log) if c.startswith("lmforge pretrain")) + 1
    pretrain_s = sum(wall for _, wall, _ in log[:upto_pretrain])
    write_text(out / "REPORT.md", _report(preset, out, log, samples, pretrain_s, sum(w for _, w, _ in log)))
    return out / "REPORT.md"


def _report(preset: str, out: Path, log: list[tuple[str, float, float]], samples: dict[str, list[tuple[str, str]]],
            pretrain_s: float, total_s: float) -> str:
    import torch

    lineage = json.loads((out / "pretrain" / "lineage.json").read_text(encoding="utf-8"))
    evals = [r for r in lineage["log"] if "eval_loss" in r]
    lines = [f"# lmforge speedrun `{preset}`", "",
             f"Corpus to pretrained model in {pretrain_s / 60:.1f} min, with SFT {total_s / 60:.1f} min.", "",
             "## Commands", "", "```", *(c for c, _, _ in log if c.startswith("lmforge ")), "```", "",
             "## Stage times", "", f"{torch.get_num_threads()} threads.", "", "| stage | wall s | CPU s |",
             "|---|---|---|", *(f"| {c.split(' --')[0]} | {wall:.1f} | {cpu:.1f} |" for c, wall, cpu in log), "",
             "## Pretraining", "", "![loss](pretrain/loss.png)", "",
             "| step | held-out loss | bits/byte |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['eval_loss']:.3f} | {r.get('eval_bpb', float('nan')):.3f} |" for r in evals]
    lines += ["", "## Samples (greedy)", ""]
    for heading, pairs in samples.items():
        lines.append(f"### {heading}")
        for prompt, text in pairs:
            lines += ["", "```", (prompt + text).strip(), "```"]
        lines.append("")
    lines += ["## Lineage", "", f"tokenizer sha256 `{lineage['tokenizer_sha256']}`, shard manifest sha256 "
              f"`{lineage['data']['manifest_sha256']}`, {lineage['data']['tokens']:,} tokens, git "
              f"`{lineage.get('git_commit')}`, hardware `{json.dumps(lineage['hardware'])}`.",
              f"Re-run the pretraining: `lmforge reproduce {out / 'pretrain' / 'model'} --out NEW_DIR`.", ""]
    return "\n".join(lines)
