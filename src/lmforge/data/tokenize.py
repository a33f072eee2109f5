"""`lmforge data tokenize`: text shards -> token shards (`data/shards.py`) for the pretraining loader.

Records stream in chunks; each chunk is encoded with `encode_batch` of HF `tokenizers`, whose Rust side already
uses every core, so no worker processes are needed here. Each document is followed by `<|endoftext|>` (or the
tokenizer's first end token). The manifest records the tokenizer file's SHA-256 and the input manifest's, so the
pretraining stage can refuse shards made with another tokenizer or from other text.
It does not clean, deduplicate or shuffle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.io import MANIFEST, InputIssues, check_out_dir, chunked, input_files, read_records
from lmforge.data.report import StageStats, write_report
from lmforge.data.shards import ShardWriter
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir, sha256_file
from lmforge.tokenizer import Tokenizer


@dataclass
class TokenizeConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    shard_tokens: int = 1 << 26
    chunk_docs: int = 1024
    bad_utf8: str = "replace"
    overwrite: bool = False


def end_of_text_id(tok: Tokenizer) -> int:
    eot = tok.backend.token_to_id("<|endoftext|>")
    if eot is not None:
        return eot
    if not tok.eos_token_ids:
        raise LmforgeError("the tokenizer has no <|endoftext|> and no eos token to end documents with")
    return tok.eos_token_ids[0]


def main(cfg: TokenizeConfig) -> dict:
    out = Path(cfg.out)
    check_out_dir(out, "tokenize", cfg.overwrite)
    tok = Tokenizer.load(Path(cfg.tokenizer))
    files = input_files(cfg.inputs)
    inputs_manifest = [str(Path(p) / MANIFEST) for p in cfg.inputs if (Path(p) / MANIFEST).is_file()]
    issues, stats = InputIssues(), StageStats("tokenize")
    bos = [tok.bos_token_id] if tok.add_bos and tok.bos_token_id is not None else []
    with atomic_dir(out) as tmp:
        tok_sha = sha256_file(Path(cfg.tokenizer) / "tokenizer.json")
        writer = ShardWriter(tmp, tok.vocab_size, end_of_text_id(tok), tok_sha, cfg.shard_tokens)
        for chunk in chunked(read_records(files, issues, cfg.bad_utf8), cfg.chunk_docs):
            texts = [r["text"] for r in chunk]
            for record, enc in zip(chunk, tok.backend.encode_batch(texts, add_special_tokens=False), strict=True):
                ids = bos + enc.ids
                writer.add(ids)
                stats.seen(record["text"])
                stats.kept(record["text"], record.get("lang"), length=len(ids))
        manifest = writer.close(
            stage="tokenize",
            config=dataclasses.asdict(cfg),
            inputs={p: sha256_file(Path(p)) for p in inputs_manifest} or {str(f): sha256_file(f) for f in files},
        )
        stats.extra["tokens"] = manifest["tokens"]
        stats.extra["characters_per_token"] = round(stats.chars_in / max(1, manifest["tokens"]), 3)
        report = write_report(tmp, stats, issues, unit="tokens")
    return report
