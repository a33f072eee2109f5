"""Deterministic, resumable batches of fixed-length windows over token shards (lmforge.data.shards.TokenShards).

The shards are one token stream; window j is tokens [j*T, j*T + T + 1) (inputs and next-token targets), so
windows cross document and shard boundaries the way GPT-style pretraining does (documents end with EOS). The last
`val_windows` windows are held out. Training windows are visited epoch by epoch in a permutation seeded by
(seed, epoch), and global sample k of step s is window perm[(s * global_batch + k) mod W]. A step's batches are
therefore a pure function of the step number: resuming needs only the step, and ranks need only their slice:
rank r of R reads samples [r * B * A, (r + 1) * B * A) of the step, split into A micro-batches of B rows, so one
process with A = R accumulation steps sees exactly the global batch that R processes see.
It does not tokenize, shuffle documents or pad; every row is full.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from lmforge.data.shards import TokenShards
from lmforge.errors import LmforgeError
from lmforge.train.loop import Batch


@dataclass
class ShardBatches:
    shards: TokenShards
    seq_len: int
    batch_size: int  # rows per micro-batch on each rank
    grad_accum: int = 1
    seed: int = 0
    val_windows: int = 0
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        lengths = [len(t) for t in self.shards.tokens]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total_windows = (int(self.offsets[-1]) - 1) // self.seq_len
        self.train_windows = total_windows - self.val_windows
        if self.train_windows < 1:
            raise LmforgeError(
                f"{self.shards.directory}: {int(self.offsets[-1])} tokens make {total_windows} windows of "
                f"{self.seq_len + 1} tokens, fewer than the {self.val_windows} held out plus one to train on; "
                "tokenize more text or lower --seq-len / --val-windows"
            )
        self._perm = lru_cache(maxsize=2)(self._permutation)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.train_windows)

    def _check(self, shard: int) -> None:
        """Refuse to read a shard whose file has gone or shrunk since the run opened it.

        A memory map outlives its file's deletion on Linux, and reading a truncated one kills the process with
        SIGBUS; one stat per read turns both into an error the user can act on, before any state is touched.
        """
        tokens = self.shards.tokens[shard]
        path = self.shards.directory / self.shards.manifest["shards"][shard]["bin"]
        try:
            size = path.stat().st_size
        except OSError as e:
            size, why = -1, e.strerror
        else:
            why = f"{size} bytes, the run opened {tokens.nbytes}"
        if size != tokens.nbytes:
            raise LmforgeError(f"{path}: shard {shard} vanished or changed mid-run ({why}); restore it and resume "
                               "with --resume (the checkpoints are intact)")

    def window(self, j: int) -> np.ndarray:
        """Tokens [j*T, j*T + T + 1) of the stream, read across shard boundaries."""
        start, end = j * self.seq_len, j * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < end:
            local = start - int(self.offsets[first])
            take = min(end, int(self.offsets[first + 1])) - start
            self._check(first)
            pieces.append(np.asarray(self.shards.tokens[first][local : local + take], dtype=np.int64))
            start, first = start + take, first + 1
        return np.concatenate(pieces)

    def _rows(self, windows: list[int]) -> Batch:
        rows = torch.from_numpy(np.stack([self.window(j) for j in windows]))  # (B, T + 1)
        return {"input_ids": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous()}

    def __call__(self, step: int) -> list[Batch]:
        """This rank's micro-batches for training step `step`."""
        per_rank = self.batch_size * self.grad_accum
        first = step * self.global_batch + self.rank * per_rank
        samples = range(first, first + per_rank)
        windows = [int(self._perm(k // self.train_windows)[k % self.train_windows]) for k in samples]
        b = self.batch_size
        return [self._rows(windows[i : i + b]) for i in range(0, per_rank, b)]

    def held_out(self) -> list[Batch]:
        """The held-out windows, in order, in micro-batches (the same on every rank)."""
        ids = list(range(self.train_windows, self.train_windows + self.val_windows))
        return [self._rows(ids[i : i + self.batch_size]) for i in range(0, len(ids), self.batch_size)]
