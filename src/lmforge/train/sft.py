"""`lmforge sft`: instruction tuning with full fine-tuning, LoRA, QLoRA or P-Tuning v2, in one stage.

main(cfg) loads the base model, turns the data files into chat-templated examples (sft_data), swaps in the
method's trainable layers (lora, ptuning; QLoRA quantizes the base first with lmforge.quant), runs the shared loop
(loop.train) and writes the result into the output directory:
  adapter.safetensors + adapter_config.json   LoRA / QLoRA / P-Tuning (use with --adapter OUT)
  model/                                      full fine-tuning: a complete checkpoint (use with --model OUT/model)
  run.json        the settings and data hashes that define this run (a resume must match them)
  lineage.json    base model lineage, data file hashes, command line, every setting, data counts, final metrics
  log.jsonl, loss.png, checkpoints/step-N/    from the loop
An output directory that holds another run is refused unless --resume (same run, continue) or --overwrite.
This module does not define the data formats (sft_data) or the training step (loop).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.fileio import sha256_file
from lmforge.train import sft_data
from lmforge.train.finetune import apply_method, final_metrics, load_base, loop_config, save_result, steps_for
from lmforge.train.loop import train
from lmforge.train.lora import LoraConfig
from lmforge.train.ptuning import PtuningConfig
from lmforge.train.rundir import identity, prepare_out
from lmforge.train.settings import SFTConfig

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "ptuning": 1e-2}


# --- model and data -----------------------------------------------------------------------------------------------


def prepare_model(cfg: SFTConfig, model: torch.nn.Module) -> LoraConfig | PtuningConfig | None:
    """Make the method's parameters trainable (in place); returns the adapter settings, None for full."""
    if cfg.method != "ptuning":
        return apply_method(cfg, model)
    from lmforge.train.ptuning import apply_ptuning

    settings = PtuningConfig(prefix_len=cfg.prefix_len)
    apply_ptuning(model, settings)
    return settings


def _build_data(
    cfg: SFTConfig, tokenizer: Tokenizer, data: list[Path], general: list[Path], max_len: int
) -> tuple[list[sft_data.Example], list[sft_data.Example], sft_data.DataStats]:
    """(training examples, held-out examples, counts)."""
    stats = sft_data.DataStats()
    identity = {"NAME": cfg.name, "AUTHOR": cfg.author}
    examples = sft_data.load_examples(data, tokenizer, max_len, cfg.overlong, cfg.bad_records, identity, stats)
    train_set, held_out = sft_data.split_eval(examples, cfg.eval_fraction, cfg.seed)
    if cfg.mix_ratio > 0:
        before = len(train_set)
        pieces = sft_data.general_pieces(general, tokenizer, max_len)
        train_set = sft_data.mix(train_set, pieces, cfg.mix_ratio, cfg.seed)
        stats.general_pieces = len(train_set) - before
    if cfg.packing:
        train_set = sft_data.pack(train_set, max_len)
    return train_set, held_out, stats


# --- the stage ----------------------------------------------------------------------------------------------------


def main(cfg: SFTConfig) -> dict:
    from lmforge.checkpoint import make_lineage, read_lineage

    cfg.validate()
    data = [sft_data.resolve_data(d) for d in cfg.data]
    general = [sft_data.resolve_data(d) for d in cfg.mix_data]
    hashes = {str(p): sha256_file(p) for p in data + general}
    out = prepare_out(cfg, identity(cfg, hashes))
    model, tokenizer, base_dir = load_base(cfg)
    max_len = min(cfg.max_len, model.cfg.max_seq_len - (cfg.prefix_len if cfg.method == "ptuning" else 0))
    train_set, held_out, stats = _build_data(cfg, tokenizer, data, general, max_len)

    torch.manual_seed(cfg.seed)  # adapter init and dropout
    settings = prepare_model(cfg, model)
    steps = steps_for(cfg, len(train_set))
    pad = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
    batches = sft_data.StepBatches(
        train_set, cfg.batch_size, cfg.grad_accum, cfg.seed, lambda examples: sft_data.collate(examples, pad)
    )
    held_out_batches = sft_data.eval_batches(held_out, cfg.batch_size, pad)
    loop = loop_config(cfg, steps, cfg.lr or DEFAULT_LR[cfg.method])
    counters = train(model, batches, held_out_batches, loop, out, label=f"sft {cfg.method}")

    counts = stats.summary() | {"train_examples": len(train_set), "eval_examples": len(held_out)}
    lineage = make_lineage(
        str(base_dir),
        kind="sft",
        method=cfg.method,
        settings=dataclasses.asdict(cfg),
        data_sha256=hashes,
        data=counts,
        train=counters | {"max_steps": steps},
        final=final_metrics(out),
        parent=read_lineage(base_dir),
    )
    chat = save_result(cfg, out, model, tokenizer, base_dir, settings, lineage)
    return {"out": str(out), "steps": steps, **counts, **final_metrics(out), "chat": chat}
