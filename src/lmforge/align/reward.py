"""Reward models: `lmforge rm train | eval | score`, and `RewardScorer` for everything that ranks replies.

A reward model is the causal LM with its vocabulary head swapped for a scalar `score` head (ModelConfig.num_labels
= 1), read at the last token of the reply: the end-of-turn marker the chat template closes the reply with, never a
padding slot. It is trained on preference pairs with the Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected -
margin) (`--margin COLUMN` reads a per-pair margin from the data), optionally plus `--center-rewards C` times
(r_chosen + r_rejected)^2. Held-out accuracy (how often chosen scores higher) and margin are logged. With LoRA the
adapters are merged at the end, so the output is always a whole checkpoint in OUT/model that Hugging Face
transformers loads as AutoModelForSequenceClassification (num_labels=1) and scores the same way: config.json names
a padding token that never ends a reply, which is where HF looks for the last real token.
This module does not generate replies (see bestof.py) or parse preference records (prefs.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.align.losses import bradley_terry
from lmforge.align.pairs import Group, collate_groups, collate_pairs, reply_scores
from lmforge.align.prefs import Pair, data_hashes, encode_prompt, encode_reply, load_pairs, load_split
from lmforge.align.settings import RM_LR, RMConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.finetune import apply_method, final_metrics, load_base, loop_config, steps_for
from lmforge.train.loop import Batch, train
from lmforge.train.rundir import identity, prepare_out
from lmforge.train.sft_data import StepBatches, resolve_data

PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")
SCORE_GROUP = 8  # replies scored per row: one prompt, up to this many replies


# --- the model ----------------------------------------------------------------------------------------------------


def pad_for_scores(tok: Tokenizer) -> int | None:
    """A token id that never ends a reply: HF's sequence classifier reads the last token that is not this one."""
    ends = set(tok.eos_token_ids[:1])
    for token in (*PAD_CANDIDATES, *tok.eos_tokens):
        token_id = tok.backend.token_to_id(token)
        if token_id is not None and token_id not in ends:
            return token_id
    return None


def add_score_head(model: Transformer, tok: Tokenizer, std: float = 0.02) -> Transformer:
    """Swap the vocabulary head for a scalar score head, in place (normal init, as transformers initialises it)."""
    weight = next(model.parameters())
    model.cfg = dataclasses.replace(model.cfg, num_labels=1, pad_token_id=pad_for_scores(tok))
    del model.lm_head
    model.score = nn.Linear(model.cfg.hidden_size, 1, bias=False, device=weight.device, dtype=weight.dtype)
    nn.init.normal_(model.score.weight, std=std)
    return model


def reward_dir(path: str | Path) -> Path:
    """A reward checkpoint: the directory itself or the OUT/model that `rm train` wrote."""
    path = Path(path).expanduser()
    return path / "model" if (path / "model" / "config.json").is_file() else path


def load_reward_model(path: str | Path, device: str | None = None) -> tuple[Transformer, Tokenizer]:
    from lmforge.checkpoint import load_checkpoint

    directory = reward_dir(path)
    model, tok = load_checkpoint(directory, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model.cfg.num_labels != 1:
        raise LmforgeError(
            f"{directory} is a language model, not a reward model (no score head); train one with `lmforge rm train`"
        )
    return model, tok


class RewardScorer:
    """Scores replies to a conversation with a reward model; the prompt is run once per group of replies."""

    def __init__(self, path: str | Path, device: str | None = None) -> None:
        self.model, self.tokenizer = load_reward_model(path, device)
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, messages: list[dict[str, str]], replies: list[str]) -> list[float]:
        tok, limit = self.tokenizer, self.model.cfg.max_seq_len
        text, prompt = encode_prompt(tok, messages)
        prompt = prompt[-(limit - 1) :]  # the end of an over-long prompt is what the replies follow
        ids = [encode_reply(tok, messages, text, r)[: limit - len(prompt)] for r in replies]
        pad = self.model.cfg.pad_token_id or 0
        scores: list[float] = []
        for i in range(0, len(ids), SCORE_GROUP):
            batch = collate_groups([Group(prompt, ids[i : i + SCORE_GROUP])], pad)
            scores += reply_scores(self.model, batch, self.device)[0].tolist()
        return scores


# --- training -----------------------------------------------------------------------------------------------------


class RewardObjective:
    """Bradley-Terry over a step's pairs (mean), with the optional per-pair margin and centring term."""

    def __init__(self, use_margin: bool, center: float) -> None:
        self.use_margin, self.center = use_margin, center

    def _terms(self, model: nn.Module, batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
        scores = reply_scores(model, batch, device)  # (B, 2)
        margin = batch["margin"].to(device) if self.use_margin else None
        return bradley_terry(scores[:, 0], scores[:, 1], margin, self.center), scores.detach()

    def step(self, model: nn.Module, micro: list[Batch], device: torch.device) -> tuple[float, int, dict[str, float]]:
        pairs = sum(len(b["input_ids"]) for b in micro)
        loss, right, margin = 0.0, 0.0, 0.0
        for batch in micro:
            losses, scores = self._terms(model, batch, device)
            (losses.sum() / pairs).backward()
            loss += float(losses.detach().sum()) / pairs
            right += float((scores[:, 0] > scores[:, 1]).sum())
            margin += float((scores[:, 0] - scores[:, 1]).sum())
        tokens = sum(int(b["tokens"].sum()) for b in micro)
        return loss, tokens, {"accuracy": right / pairs, "margin": margin / pairs}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        losses, scores = zip(*(self._terms(model, b, device) for b in batches), strict=True)
        model.train(was_training)
        return {"eval_loss": float(torch.cat(losses).mean()), **pair_metrics(torch.cat(scores), prefix="eval_")}


def pair_metrics(scores: Tensor, prefix: str = "") -> dict[str, float]:
    """Accuracy (chosen scored higher) and mean margin of (N, 2) chosen/rejected scores."""
    return {f"{prefix}accuracy": float((scores[:, 0] > scores[:, 1]).float().mean()),
            f"{prefix}margin": float((scores[:, 0] - scores[:, 1]).mean())}


def _batches(pairs: list[Pair], size: int, pad: int) -> list[Batch]:
    return [collate_pairs(pairs[i : i + size], pad) for i in range(0, len(pairs), size)]


def main(cfg: RMConfig) -> dict:
    from lmforge.checkpoint import make_lineage, read_lineage, save_checkpoint
    from lmforge.fileio import write_json
    from lmforge.train.lora import merge_lora

    cfg.validate()
    hashes = data_hashes(cfg.data + cfg.eval_data)
    out = prepare_out(cfg, identity(cfg, hashes))
    model, tokenizer, base_dir = load_base(cfg)
    train_set, held, stats = load_split(cfg, tokenizer, min(cfg.max_len, model.cfg.max_seq_len), cfg.margin)

    torch.manual_seed(cfg.seed)  # head and adapter init
    add_score_head(model, tokenizer)
    apply_method(cfg, model)
    model.score.requires_grad_(True)  # LoRA freezes everything else; the head is new and always learns
    pad = model.cfg.pad_token_id or 0
    steps = steps_for(cfg, len(train_set))
    batches = StepBatches(train_set, cfg.batch_size, cfg.grad_accum, cfg.seed, lambda ps: collate_pairs(ps, pad))
    objective = RewardObjective(cfg.margin is not None, cfg.center_rewards)
    loop = loop_config(cfg, steps, cfg.lr or RM_LR[cfg.method])
    counters = train(model, batches, _batches(held, cfg.batch_size, pad), loop, out, label=f"rm {cfg.method}",
                     objective=objective)

    if cfg.method == "lora":
        merge_lora(model)
    counts = stats.summary() | {"train_pairs": len(train_set), "eval_pairs": len(held)}
    extra = ("eval_accuracy", "eval_margin")
    lineage = make_lineage(
        str(base_dir), kind="reward_model", method=cfg.method, settings=dataclasses.asdict(cfg), data_sha256=hashes,
        data=counts, train=counters | {"max_steps": steps}, final=final_metrics(out, extra),
        parent=read_lineage(base_dir),
    )
    write_json(out / "lineage.json", lineage)
    save_checkpoint(out / "model", model.cfg, model.state_dict(), tokenizer, lineage)
    return {"out": str(out), "model": str(out / "model"), "steps": steps, **counts, **final_metrics(out, extra),
            "score": f"lmforge rm score --model {out} --prompt TEXT --reply TEXT"}


# --- eval and score -----------------------------------------------------------------------------------------------


def evaluate_pairs(path: str | Path, data: list[str], batch_size: int = 8, bad_records: str = "stop",
                   progress: bool = True) -> dict:
    """`lmforge rm eval`: pair accuracy and mean margin of a reward model on preference files."""
    from lmforge.progress import track

    model, tok = load_reward_model(path)
    pairs = load_pairs([resolve_data(d) for d in data], tok, model.cfg.max_seq_len, bad_records)
    pad, device = model.cfg.pad_token_id or 0, next(model.parameters()).device
    with torch.no_grad():
        scores = torch.cat([reply_scores(model, b, device)
                            for b in track(_batches(pairs, batch_size, pad), "scoring pairs", enabled=progress)])
    return {**pair_metrics(scores), "pairs": len(pairs)}


def print_eval(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print(f"accuracy: {result['accuracy']:.4f}\nmargin: {result['margin']:.4f}\npairs: {result['pairs']}")
