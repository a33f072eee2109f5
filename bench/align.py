"""Reward-model and DPO training speed and peak memory of lmforge beside TRL, on the same model, data and batches.

    python bench/align.py [--model NAME ...] [--tasks rm-full,rm-lora,dpo-lora,dpo-full] [--steps 10] [--warmup 2]
                          [--batch 4] [--max-len 512] [--lr LR] [--rounds 2] [--threads 2]
    (default models: smollm2-135m-instruct and qwen2.5-coder-0.5b-instruct; needs the `bench` extra for TRL)

What runs: for every model and task, `lmforge rm train` / `lmforge dpo` (through lmforge's own CLI entry point, the
code a user runs) beside TRL's RewardTrainer / DPOTrainer, both on `builtin:preferences` (200 bilingual
prompt/chosen/rejected records), the same checkpoint directory (`lmforge.catalog.resolve_model`, which transformers
loads directly), batch size, max length, learning rate (our method's default unless --lr) and number of steps; fp32
on CPU (`use_cpu=True`, no bf16, no gradient checkpointing), `--threads` threads (torch.set_num_threads in each
process and OMP_NUM_THREADS). LoRA on both sides: rank 8, alpha 16, dropout 0 on the 7 linear projections (PEFT;
for the reward model with task_type SEQ_CLS, so the new score head trains as ours does). DPO: loss sigmoid, beta 0.1.
- tasks: rm full, rm lora (ours `rm train --method full|lora`); dpo lora (ours `dpo --method lora`: the reference
  is the policy with its adapters switched off, one extra no-grad forward per step; and with `--precompute-ref`,
  compared with TRL's precompute setting); dpo full (ours `dpo --method full`: reference log-probs precomputed once
  before training, no copy of the weights).
- TRL settings: its default, and for DPO also `precompute_ref_log_probs=True` (its best setting for speed and
  memory). What TRL keeps as the reference is read from the trainer after construction and printed: with a PEFT
  model (as of TRL 1.16) `ref_model` is None and each step runs the base with the adapters disabled (no copy); for full
  fine-tuning it loads a second copy of the model unless the log-probs are precomputed.
- same batches: lmforge reads pair k of step s from a seeded permutation (train.sft_data.StepBatches, held-out
  fraction 0); TRL gets the same records in that order, in conversational form (lists of messages) so its tokenizer
  applies the model's chat template, with a sequential sampler. Both sides then see the same pairs in every step.
- tokens: per pair, the tokens of prompt+chosen and of prompt+rejected without padding (2*prompt + chosen +
  rejected), the usual count: ours from its log.jsonl (`tokens` per step), TRL's from the attention mask of each
  batch its collator builds. The table prints both per-pair means; they differ by the template's trailing newline
  after the end-of-turn marker, which TRL keeps and lmforge does not (about 1 token per reply). lmforge runs the
  shared prompt once per pair, which is part of what is measured: the count is the same on both sides.
- time: a step is data collation, forward, backward, clipping and AdamW. Ours: `tokens / tok_s` of each step in
  log.jsonl (the loop's own clock). TRL: the time between consecutive `on_step_end` callbacks (which also covers
  fetching and collating the batch, and its per-step logging; the first step from `on_step_begin`). The first
  `--warmup` steps are dropped; tokens/s = measured tokens / measured seconds.
- memory: every configuration runs in its own subprocess; peak RSS is the child's VmHWM (/proc/self/status) read
  when training is done: TRL's after `train()` (it saves nothing here), ours when the last step is done, before the
  loop saves its resumable checkpoint; the per-run lines also give ours at exit (after the CLI saved its result).
- rounds: the configurations alternate (ours first in odd rounds, TRL first in even ones); the report gives medians.
Goal (the alignment issue): for DPO with LoRA, >= 1.3x TRL's tokens/s and <= 0.6x its peak memory, against its
default and against its best setting. This script does not tune hyperparameters; it measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
TASKS = ("rm-full", "rm-lora", "dpo-lora", "dpo-full")
TRL_SETTINGS = {"rm-full": ("default",), "rm-lora": ("default",), "dpo-lora": ("default", "precompute"),
                "dpo-full": ("default", "precompute")}
# Ours: DPO with LoRA also with --precompute-ref (the reference pass before training, as TRL's precompute setting);
# full DPO precomputes by default. A TRL setting is compared with ours of the same name, else with ours' default.
OURS_SETTINGS = {"dpo-lora": ("default", "precompute")}
RANK, ALPHA, DROPOUT = 8, 16.0, 0.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA = "builtin:preferences"
SEED = 0
BETA = 0.1
RESULT = "RESULT "  # the prefix of a child's result line on stdout


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def default_lr(task: str) -> float:
    from lmforge.align.settings import DPO_LR, RM_LR

    kind, method = task.split("-")
    return (RM_LR if kind == "rm" else DPO_LR)[method]


# --- children: one configuration each ----------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict:
    """`lmforge rm train` / `lmforge dpo` through the CLI, in this process; the steps from its log.jsonl."""
    import lmforge.train.loop as loop
    from lmforge.cli import main as lmforge

    # The loop saves a resumable checkpoint right after the last step, then the stage saves its result: read the
    # peak before the first save too, so that training is compared with TRL's training (which saves nothing here).
    # (Without loop._save, the peak at exit stands.)
    before_save: list[float] = []
    save = getattr(loop, "_save", None)

    def peak_then_save(*a, **kw) -> None:
        before_save.append(peak_rss_mib())
        save(*a, **kw)

    if save is not None:
        loop._save = peak_then_save
    kind, method = args.task.split("-")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = [*(["rm", "train"] if kind == "rm" else ["dpo"]), "--out", str(out), "--model", args.model,
                "--method", method, "--data", DATA, "--eval-fraction", "0", "--max-steps", str(args.steps),
                "--batch-size", str(args.batch), "--max-len", str(args.max_len), "--lr", str(args.lr),
                "--eval-every", "0", "--save-every", "0", "--seed", str(SEED), "--device", "cpu",
                "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--lora-dropout", str(DROPOUT)]
        if kind == "dpo":
            argv += ["--loss", "sigmoid", "--beta", str(BETA)]
        if args.setting == "precompute":
            argv += ["--precompute-ref"]
        code = lmforge(argv)
        if code != 0:
            raise SystemExit(f"lmforge {' '.join(argv)} exited {code}")
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"tokens": r["tokens"], "dt": r["tokens"] / r["tok_s"], "loss": r["loss"]} for r in log if "tok_s" in r]
    reference = {"dpo-lora": "policy with adapters off, per step", "dpo-full": "precomputed"}.get(args.task, "-")
    if args.setting == "precompute":
        reference = "precomputed"
    at_exit = peak_rss_mib()
    return {"steps": steps, "peak_mib": before_save[0] if before_save else at_exit, "exit_peak_mib": at_exit,
            "reference": reference}


def step_order(n: int, args: argparse.Namespace) -> list[int]:
    """The record indices lmforge's StepBatches reads over --steps steps (held-out fraction 0, grad accum 1)."""
    from lmforge.train.sft_data import StepBatches

    order = StepBatches(list(range(n)), args.batch, 1, SEED, collate=lambda xs: xs)
    return [i for s in range(args.steps) for i in order(s)[0]]


def trl_dataset(args: argparse.Namespace):  # -> datasets.Dataset
    """The preference records in the order lmforge reads them, as conversations (TRL applies the chat template)."""
    from datasets import Dataset

    from lmforge.train.sft_data import resolve_data

    lines = resolve_data(DATA).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
            for r in (records[i] for i in step_order(len(records), args))]
    return Dataset.from_list(rows)


def run_trl(args: argparse.Namespace) -> dict:
    """TRL's RewardTrainer / DPOTrainer on the same batches; step times from callbacks, tokens from the collator."""
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from lmforge.catalog import resolve_model

    kind, method = args.task.split("-")
    directory = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    lora = None
    if method == "lora":
        lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, bias="none",
                          task_type="SEQ_CLS" if kind == "rm" else "CAUSAL_LM")

    class Clock(TrainerCallback):
        """Wall-clock marks: the first step's start, then every step's end; and the logged loss of each step."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.losses: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock, tokens = Clock(), []
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(output_dir=tmp, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                      max_steps=args.steps, learning_rate=args.lr, max_grad_norm=1.0, max_length=args.max_len,
                      use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1,
                      save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=SEED,
                      dataloader_num_workers=0, train_sampling_strategy="sequential",
                      model_init_kwargs={"dtype": "float32"})
        if kind == "rm":
            from trl import RewardConfig, RewardTrainer

            trainer = RewardTrainer(model=directory, args=RewardConfig(**common), train_dataset=trl_dataset(args),
                                    processing_class=tokenizer, peft_config=lora, callbacks=[clock])
            reference = "-"
        else:
            from trl import DPOConfig, DPOTrainer

            cfg = DPOConfig(**common, loss_type="sigmoid", beta=BETA,
                            precompute_ref_log_probs=args.setting == "precompute")
            trainer = DPOTrainer(model=directory, args=cfg, train_dataset=trl_dataset(args),
                                 processing_class=tokenizer, peft_config=lora, callbacks=[clock])
            reference = ("precomputed" if cfg.precompute_ref_log_probs else "copy of the model"
                         if trainer.ref_model is not None else "policy with adapters disabled, per step")
        collate = trainer.data_collator

        def counting(features: list[dict]) -> dict:
            batch = collate(features)
            tokens.append(int(batch["attention_mask"].sum()))  # prompt+chosen and prompt+rejected rows, no padding
            return batch

        trainer.data_collator = counting
        torch.manual_seed(SEED)
        trainer.train()
    if len(tokens) < args.steps or len(clock.marks) != args.steps + 1:
        raise SystemExit(f"TRL ran {len(clock.marks) - 1} steps over {len(tokens)} batches, expected {args.steps}")
    losses = (clock.losses + [None] * args.steps)[: args.steps]
    steps = [{"tokens": tokens[i], "dt": clock.marks[i + 1] - clock.marks[i], "loss": losses[i]}
             for i in range(args.steps)]
    peak = peak_rss_mib()  # nothing is saved (save_strategy "no"): this is training's peak
    return {"steps": steps, "peak_mib": peak, "exit_peak_mib": peak, "reference": reference}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_ours(args) if args.child == "ours" else run_trl(args)
    print(RESULT + json.dumps(result), flush=True)


# --- the parent: alternate the configurations, report medians ------------------------------------------------------


def measure(side: str, model: str, task: str, setting: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--child", side, "--model", model, "--tasks", task, "--setting", setting,
           "--steps", str(args.steps), "--batch", str(args.batch), "--max-len", str(args.max_len),
           "--lr", str(args.lr or default_lr(task)), "--threads", str(args.threads)]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        print(f"    {side} {task} ({setting}) failed, exit {done.returncode}:\n{done.stderr[-3000:]}", flush=True)
        return None
    result = json.loads(lines[-1].removeprefix(RESULT))
    measured = result["steps"][args.warmup :]
    tokens, seconds = sum(s["tokens"] for s in measured), sum(s["dt"] for s in measured)
    pairs = args.batch * len(result["steps"])
    return {"tok_s": tokens / seconds, "peak_mib": result["peak_mib"], "exit_peak_mib": result["exit_peak_mib"],
            "reference": result["reference"],
            "tok_pair": sum(s["tokens"] for s in result["steps"]) / pairs, "first_loss": result["steps"][0]["loss"],
            "first_step_s": result["steps"][0]["dt"], "wall_s": wall}


def _line(label: str, r: dict) -> str:
    loss = "-" if r["first_loss"] is None else f"{r['first_loss']:.4f}"
    return (f"    {label:26s} {r['tok_s']:7.1f} tok/s  peak {r['peak_mib']:6.0f} MiB (at exit "
            f"{r['exit_peak_mib']:6.0f})  {r['tok_pair']:6.1f} tok/pair  step-1 loss {loss}  first step "
            f"{r['first_step_s']:5.1f} s  process {r['wall_s']:4.0f} s  reference: {r['reference']}")


def _median(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    out = {k: statistics.median(r[k] for r in runs) for k in ("tok_s", "peak_mib", "tok_pair")}
    return out | {"reference": runs[0]["reference"]}


def run_model(model: str, tasks: list[str], args: argparse.Namespace) -> list[tuple]:
    print(f"\n{model}: {args.steps} steps ({args.warmup} warm-up dropped), batch {args.batch} pairs, max len "
          f"{args.max_len}, {args.threads} threads, fp32 CPU, {args.rounds} round(s)", flush=True)
    configs = [(t, "ours", s) for t in tasks for s in OURS_SETTINGS.get(t, ("default",))]
    configs += [(t, "trl", s) for t in tasks for s in TRL_SETTINGS[t]]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        print(f"  round {round_ + 1}", flush=True)
        for task in tasks:
            mine = [c for c in configs if c[0] == task]
            ours, theirs = [c for c in mine if c[1] == "ours"], [c for c in mine if c[1] == "trl"]
            for config in (ours + theirs) if round_ % 2 == 0 else (theirs + ours):
                r = measure(config[1], model, task, config[2], args)
                if r:
                    runs[config].append(r)
                    label = f"{task} {'lmforge' if config[1] == 'ours' else 'TRL'} {config[2]}"
                    print(_line(label, r), flush=True)
    rows = []
    for task in tasks:
        for setting in TRL_SETTINGS[task]:
            mine = setting if setting in OURS_SETTINGS.get(task, ()) else "default"
            rows.append((model, task, setting, _median(runs[(task, "ours", mine)]),
                         _median(runs[(task, "trl", setting)])))
    return rows


def report(rows: list[tuple], args: argparse.Namespace) -> None:
    print(f"\nmedians over {args.rounds} round(s); tokens/s over steps {args.warmup + 1}..{args.steps}; peak = "
          "VmHWM when training is done (before ours saves), MiB; tok/pair = 2*prompt + chosen + rejected, no padding")
    head = (f"{'model':28s} {'task':9s} {'TRL setting':12s} {'ours tok/s':>10s} {'TRL tok/s':>10s} {'ratio':>6s} "
            f"{'ours MiB':>9s} {'TRL MiB':>8s} {'ratio':>6s} {'tok/pair ours':>14s} {'TRL':>6s}  TRL reference")
    print(head)
    print("-" * len(head))
    for model, task, setting, ours, trl in rows:
        if not ours or not trl:
            print(f"{model:28s} {task:9s} {setting:12s} (failed: {'ours' if not ours else 'TRL'})")
            continue
        print(f"{model:28s} {task.replace('-', ' '):9s} {setting:12s} {ours['tok_s']:10.1f} {trl['tok_s']:10.1f} "
              f"{ours['tok_s'] / trl['tok_s']:5.2f}x {ours['peak_mib']:9.0f} {trl['peak_mib']:8.0f} "
              f"{ours['peak_mib'] / trl['peak_mib']:5.2f}x {ours['tok_pair']:14.1f} {trl['tok_pair']:6.1f}  "
              f"{trl['reference']}")
    for model in dict.fromkeys(r[0] for r in rows):
        dpo = [(s, o, t) for m, task, s, o, t in rows if m == model and task == "dpo-lora" and o and t]
        if not dpo:
            continue
        best_speed, best_mem = max(t["tok_s"] for _, _, t in dpo), min(t["peak_mib"] for _, _, t in dpo)
        speed = max(o["tok_s"] for _, o, _ in dpo) / best_speed  # each side's best setting
        mem = min(o["peak_mib"] for _, o, _ in dpo) / best_mem
        verdict = "met" if speed >= 1.3 and mem <= 0.6 else "not met"
        detail = ", ".join(f"{s}: x{o['tok_s'] / t['tok_s']:.2f} tok/s, x{o['peak_mib'] / t['peak_mib']:.2f} memory"
                           for s, o, t in dpo)
        print(f"goal, {model} dpo lora (>= 1.3x tok/s, <= 0.6x memory of TRL's best setting): x{speed:.2f} tok/s, "
              f"x{mem:.2f} memory -> {verdict} ({detail})")


def missing_peers() -> list[str]:
    return [p for p in ("trl", "peft", "datasets", "transformers") if importlib.util.find_spec(p) is None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help=f"catalog name or checkpoint directory, repeatable (default: "
                   f"{', '.join(MODELS)})")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from " + ", ".join(TASKS))
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--max-len", type=int, default=512, help="tokens per sequence (prompt + reply)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: lmforge's for the method)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--setting", default="-", help=argparse.SUPPRESS)
    args = p.parse_args()
    tasks = args.tasks.split(",")
    if unknown := [t for t in tasks if t not in TASKS]:
        p.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if args.child:
        args.model, args.task = args.model[0], tasks[0]
        child(args)
        return
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} leaves nothing to measure after --warmup {args.warmup}")
    if gone := missing_peers():
        print(f"bench/align.py needs {', '.join(gone)} for the TRL side: pip install -e '.[bench]' "
              "(or pip install trl peft datasets)", file=sys.stderr)
        sys.exit(2)
    import trl

    print(f"TRL {trl.__version__}; lmforge rm train / dpo vs RewardTrainer / DPOTrainer on {DATA}")
    rows = [row for model in (args.model or MODELS) for row in run_model(model, tasks, args)]
    report(rows, args)


if __name__ == "__main__":
    main()
