"""The alignment side of the `lmforge` command: `rm train | eval | score` and `dpo`.

Their flags come from the stages' dataclasses (cli_flags), so a default or a help text is written once.
"""

from __future__ import annotations

import argparse
import json

from lmforge.cli_flags import add_flags, config_from


def cmd_rm_train(args: argparse.Namespace) -> None:
    from lmforge.align.reward import main
    from lmforge.align.settings import RMConfig
    from lmforge.train.rundir import report

    report(main(config_from(RMConfig, args)))


def cmd_rm_eval(args: argparse.Namespace) -> None:
    from lmforge.align.reward import evaluate_pairs, print_eval

    print_eval(evaluate_pairs(args.model, args.data, args.batch_size, args.bad_records), args.json)


def cmd_rm_score(args: argparse.Namespace) -> None:
    from lmforge.align.reward import RewardScorer

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    scores = RewardScorer(args.model).score(messages, args.reply)
    if args.json:
        print(json.dumps([{"reply": r, "score": s} for r, s in zip(args.reply, scores, strict=True)],
                         ensure_ascii=False))
    else:
        for score in scores:
            print(f"{score:.4f}")


def cmd_dpo(args: argparse.Namespace) -> None:
    from lmforge.align.dpo import main
    from lmforge.align.settings import DPOConfig
    from lmforge.train.rundir import report

    report(main(config_from(DPOConfig, args)))


def add_commands(sub: argparse._SubParsersAction) -> None:
    from lmforge.align.settings import DPO_METHODS, LOSSES, RM_METHODS, DPOConfig, RMConfig

    rm = sub.add_parser("rm", help="reward models: train on preference pairs, evaluate, score replies")
    actions = rm.add_subparsers(dest="rm_command", required=True)
    p = actions.add_parser("train", help="train a reward model (Bradley-Terry) on preference pairs")
    add_flags(p, RMConfig, {"method": RM_METHODS, "bad_records": ("stop", "skip")}, skip=("quant",))
    p.set_defaults(func=cmd_rm_train)

    p = actions.add_parser("eval", help="pair accuracy and mean margin of a reward model on preference files")
    p.add_argument("--model", required=True, help="a reward model directory (from `lmforge rm train`)")
    p.add_argument("--data", nargs="+", required=True, help="preference .json/.jsonl files or builtin:preferences")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bad-records", choices=("stop", "skip"), default="stop")
    p.add_argument("--json", action="store_true", help='print {"accuracy": ..., "margin": ..., "pairs": N}')
    p.set_defaults(func=cmd_rm_eval)

    p = actions.add_parser("score", help="score replies to a prompt with a reward model")
    p.add_argument("--model", required=True, help="a reward model directory (from `lmforge rm train`)")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--reply", action="append", required=True, help="a reply to score (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--json", action="store_true", help="print a JSON list of {reply, score}")
    p.set_defaults(func=cmd_rm_score)

    p = sub.add_parser("dpo", help="preference-tune a model: DPO, IPO, hinge, robust, SimPO, ... (LoRA, QLoRA, full)")
    add_flags(p, DPOConfig, {"method": DPO_METHODS, "loss": LOSSES, "bad_records": ("stop", "skip")})
    p.set_defaults(func=cmd_dpo)
