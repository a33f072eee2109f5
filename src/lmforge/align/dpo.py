"""`lmforge dpo`: direct preference optimization and its family (IPO, hinge, robust, SimPO, ...), on LoRA, QLoRA or
full fine-tuning, through the shared training loop.

The reference model costs no second copy of the weights where it can be avoided:
- LoRA / QLoRA: the reference is the policy with its adapters switched off (`lora.adapters_off`), run without
  gradients on the same batch;
- full fine-tuning: the reference log-probabilities are computed once, before training, and cached on disk under
  a key made of the base model's files and every pair's token ids (`--precompute-ref`, the default for full; LoRA
  can use it too, to skip the per-step reference forward). Without it, full fine-tuning keeps a frozen copy;
- SimPO needs no reference at all.
Each pair is one row (prompt once, then both replies; see pairs.py). The log holds, per step, the loss, the
implicit rewards beta * (policy - reference) of chosen and rejected replies, how often chosen wins (accuracy), their
margin and the log-probabilities themselves (a chosen log-probability falling with the rejected one is the failure
`--sft-weight`, RPO's NLL term on the chosen reply, counters). The output is an adapter (use with --adapter) or
model/ for full fine-tuning, with lineage.json, log.jsonl and loss.png, and `--resume` continues a killed run
exactly, as `lmforge sft` does.
This module does not parse preference records (prefs.py) or define the losses (losses.py).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.align.losses import LossConfig, preference_loss
from lmforge.align.pairs import collate_pairs, reply_logps
from lmforge.align.prefs import Pair, data_hashes, load_split
from lmforge.align.settings import DPO_LR, LENGTH_AVERAGED, REFERENCE_FREE, DPOConfig
from lmforge.progress import track
from lmforge.train.finetune import (
    apply_method,
    final_metrics,
    load_base,
    loop_config,
    save_result,
    steps_for,
)
from lmforge.train.loop import Batch, train
from lmforge.train.lora import adapters_off
from lmforge.train.rundir import identity, prepare_out
from lmforge.train.sft_data import StepBatches

REWARD_METRICS = ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")
Reference = Callable[[Batch, torch.device], Tensor]  # a batch -> the reference's (B, 2) summed log-probabilities


class PreferenceObjective:
    """The DPO-family loss of a step's pairs (mean over pairs) plus sft_weight times the chosen replies' mean NLL."""

    def __init__(self, cfg: LossConfig, sft_weight: float, reference: Reference | None) -> None:
        self.cfg, self.sft_weight, self.reference = cfg, sft_weight, reference

    def _terms(self, model: nn.Module, batch: Batch, device: torch.device) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(per-pair losses (B,), summed chosen NLL, per-pair metrics)."""
        # The reference first: its logits are gone before the policy's, which backward keeps, are made.
        ref = None if self.cfg.loss in REFERENCE_FREE else self.reference(batch, device)
        logps, nll = reply_logps(model, batch, device)  # (B, 2) summed; (B, K)
        scored, ref_scored = logps, ref
        if self.cfg.loss in LENGTH_AVERAGED:
            lengths = batch["reply_len"].to(device).float()
            scored, ref_scored = logps / lengths, None if ref is None else ref / lengths
        terms = preference_loss(
            self.cfg, scored[:, 0], scored[:, 1], *((None, None) if ref_scored is None else ref_scored.unbind(1))
        )
        chosen_nll = (nll * (batch["read_reply"].to(device) == 0)).sum()
        c, r = terms.chosen_rewards, terms.rejected_rewards
        metrics = {
            "rewards/chosen": c, "rewards/rejected": r, "rewards/accuracy": (c > r).float(), "rewards/margin": c - r,
            "logps/chosen": logps[:, 0].detach(), "logps/rejected": logps[:, 1].detach(),
        }
        return terms.losses, chosen_nll, metrics

    def step(self, model: nn.Module, micro: list[Batch], device: torch.device) -> tuple[float, int, dict[str, float]]:
        pairs = sum(len(b["input_ids"]) for b in micro)
        chosen_tokens = sum(int(b["reply_len"][:, 0].sum()) for b in micro)
        loss, sums = 0.0, {}
        for batch in micro:
            losses, chosen_nll, metrics = self._terms(model, batch, device)
            total = losses.sum() / pairs + self.sft_weight * chosen_nll / chosen_tokens
            total.backward()
            loss += float(total.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        tokens = sum(int(b["tokens"].sum()) for b in micro)
        return loss, tokens, {k: v / pairs for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        pairs = sum(len(b["input_ids"]) for b in batches)
        sums: dict[str, float] = {}
        for batch in batches:
            losses, _, metrics = self._terms(model, batch, device)
            for k, v in {"loss": losses, **{m: metrics[m] for m in REWARD_METRICS}}.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        model.train(was_training)
        return {f"eval_{k}": v / max(pairs, 1) for k, v in sums.items()}


# --- the reference ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _logps_without_adapters(model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
    was_training = model.training
    model.eval()
    with adapters_off(model):
        logps, _ = reply_logps(model, batch, device)
    model.train(was_training)
    return logps


def _cache_key(base_dir: Path, cfg: DPOConfig, pairs: list[Pair]) -> str:
    """Names what the reference log-probs depend on: the base's files, the method's rounding and every token id."""
    from lmforge.checkpoint import weight_files

    h = hashlib.sha256()
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(base_dir)]
    h.update(repr((str(base_dir.resolve()), files, cfg.method, cfg.quant if cfg.method == "qlora" else None)).encode())
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    return h.hexdigest()[:16]


def precompute_reference(model: nn.Module, pairs: list[Pair], batch_size: int, pad_id: int, key: str,
                         progress: bool = True) -> Path:
    """Fill every pair's `ref` with the model's (adapters off) summed log-probabilities, from the cache or by one
    pass over the pairs; returns the cache file."""
    from safetensors.torch import load_file, save_file

    from lmforge.fileio import atomic_path
    from lmforge.paths import cache_dir

    path = cache_dir() / "dpo-reference" / f"{key}.safetensors"
    if path.is_file():
        logps = load_file(str(path))["logps"]
    else:
        device = next(model.parameters()).device
        chunks = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
        rows = [_logps_without_adapters(model, collate_pairs(c, pad_id), device).cpu()
                for c in track(chunks, "reference log-probs", enabled=progress)]
        logps = torch.cat(rows)
        with atomic_path(path) as tmp:
            save_file({"logps": logps.contiguous()}, tmp)
    for pair, row in zip(pairs, logps.tolist(), strict=True):
        pair.ref = (row[0], row[1])
    return path


def _reference(cfg: DPOConfig, model: nn.Module, pairs: list[Pair], base_dir: Path, pad_id: int) -> Reference | None:
    if cfg.loss in REFERENCE_FREE:
        return None
    if cfg.precompute():
        path = precompute_reference(model, pairs, cfg.batch_size, pad_id, _cache_key(base_dir, cfg, pairs),
                                    cfg.progress)
        print(f"lmforge: reference log-probabilities cached in {path}", file=sys.stderr)
        return lambda batch, device: batch["ref_logps"].to(device)
    if cfg.method == "full":  # no adapters to switch off: a frozen copy of the starting weights
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        return lambda batch, device: _logps_without_adapters(frozen, batch, device)
    return lambda batch, device: _logps_without_adapters(model, batch, device)


# --- the stage ----------------------------------------------------------------------------------------------------


def main(cfg: DPOConfig) -> dict:
    from lmforge.checkpoint import make_lineage, read_lineage

    cfg.validate()
    hashes = data_hashes(cfg.data + cfg.eval_data)
    out = prepare_out(cfg, identity(cfg, hashes))
    model, tokenizer, base_dir = load_base(cfg)
    train_set, held, stats = load_split(cfg, tokenizer, min(cfg.max_len, model.cfg.max_seq_len))
    pad = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0

    torch.manual_seed(cfg.seed)  # adapter init
    adapter = apply_method(cfg, model)
    reference = _reference(cfg, model, train_set + held, base_dir, pad)
    losses = LossConfig(cfg.loss, cfg.effective_beta(), cfg.label_smoothing, cfg.gamma)
    objective = PreferenceObjective(losses, cfg.sft_weight, reference)
    steps = steps_for(cfg, len(train_set))
    batches = StepBatches(train_set, cfg.batch_size, cfg.grad_accum, cfg.seed, lambda ps: collate_pairs(ps, pad))
    held_batches = [collate_pairs(held[i : i + cfg.batch_size], pad) for i in range(0, len(held), cfg.batch_size)]
    loop = loop_config(cfg, steps, cfg.lr or DPO_LR[cfg.method])
    counters = train(model, batches, held_batches, loop, out, label=f"dpo {cfg.loss}", objective=objective)

    counts = stats.summary() | {"train_pairs": len(train_set), "eval_pairs": len(held)}
    extra = tuple(f"eval_{m}" for m in REWARD_METRICS)
    lineage = make_lineage(
        str(base_dir), kind="dpo", method=cfg.method, settings=dataclasses.asdict(cfg), data_sha256=hashes,
        data=counts, train=counters | {"max_steps": steps}, final=final_metrics(out, extra),
        parent=read_lineage(base_dir),
    )
    chat = save_result(cfg, out, model, tokenizer, base_dir, adapter, lineage)
    return {"out": str(out), "steps": steps, **counts, **final_metrics(out, extra), "chat": chat}
