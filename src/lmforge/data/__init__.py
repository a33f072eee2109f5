"""The corpus pipeline: clean, deduplicate, tokenize and describe pretraining text (`lmforge data ...`).

`io` reads corpus files and writes sharded JSONL with a manifest; `filters` holds the language-aware rules;
`clean`, `dedup`, `decontaminate`, `tokenize`, `stats`, `synth` and `fetch` are the stages (a config dataclass and
`main(cfg)` each); `report` writes every stage's stats.json / report.md / lengths.png; `parallel` is the ordered,
bounded process pool; `shards` is the token shard format the pretraining loader reads.
"""
