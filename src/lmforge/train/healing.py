"""Self-healing for long runs: catch NaN/inf and loss spikes, roll back, skip the data, cool the learning rate.

The loop (loop.train) asks `check` after the backward pass and before the optimizer step, so a bad batch never
touches the weights. On a problem the loop reloads the last checkpoint and asks `after_problem` for the history to
carry over: which data steps to skip from now on (the offending one and `skip_batches - 1` after it, as PaLM did),
how many rollbacks so far, and until which step the learning rate stays lowered. A spike is a loss above
`spike_factor` times the running mean (an exponential moving average of recent losses, which lives in the
checkpointed counters so that a resumed run judges exactly as the uninterrupted one would).
It does not save or load anything itself, and it does not decide what a "good" checkpoint is: the last one is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.errors import LmforgeError


@dataclass
class HealingConfig:
    spike_factor: float = 2.0  # loss above factor x running mean is a spike; 0 = detect NaN/inf only
    min_steps: int = 10  # steps of history before spikes are judged
    ema_decay: float = 0.9
    skip_batches: int = 1  # data steps skipped from the offending one on
    max_rollbacks: int = 5
    cooldown_steps: int = 0  # steps after a rollback with the learning rate scaled by cooldown_factor
    cooldown_factor: float = 0.5


class Healer:
    def __init__(self, cfg: HealingConfig) -> None:
        self.cfg = cfg

    def check(self, loss: float, grad_norm: float, counters: dict) -> dict | None:
        """None when the step may proceed, else {"reason": ..., facts} describing what was wrong."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return {"reason": "nonfinite", "loss": _json_float(loss), "grad_norm": _json_float(grad_norm)}
        mean, seen = counters.get("loss_ema"), counters.get("loss_seen", 0)
        judged = self.cfg.spike_factor and mean is not None and seen >= self.cfg.min_steps
        if judged and loss > self.cfg.spike_factor * mean:
            return {"reason": "spike", "loss": loss, "running_mean": mean}
        return None

    def observe(self, loss: float, counters: dict) -> dict:
        """Counters with the running loss estimate updated by a step that went through."""
        mean, decay = counters.get("loss_ema"), self.cfg.ema_decay
        new = loss if mean is None else decay * mean + (1 - decay) * loss
        return counters | {"loss_ema": new, "loss_seen": counters.get("loss_seen", 0) + 1}

    def after_problem(self, counters: dict, problem: dict) -> dict:
        """Healing history to keep across the rollback; raises once max_rollbacks are spent."""
        rollbacks = counters.get("rollbacks", 0) + 1
        if rollbacks > self.cfg.max_rollbacks:
            raise LmforgeError(
                f"training step {counters['step'] + 1}: {problem['reason']} loss ({problem.get('loss')}) after "
                f"{self.cfg.max_rollbacks} rollbacks; the run is not healing. Lower --lr, raise --warmup-steps "
                "or inspect the data around this step; resume with --resume from the last checkpoint"
            )
        first = problem["data_step"]
        skipped = sorted(set(counters.get("skipped", [])) | set(range(first, first + self.cfg.skip_batches)))
        return {
            "rollbacks": rollbacks,
            "skipped": skipped,
            "cooldown_until": counters["step"] + self.cfg.cooldown_steps,
        }

    def data_step(self, step: int, counters: dict) -> int:
        """The data step a training step reads: the step-th one that is not skipped."""
        data = step
        for skipped in counters.get("skipped", []):  # sorted ascending
            if skipped <= data:
                data += 1
        return data

    def lr_scale(self, counters: dict) -> float:
        return self.cfg.cooldown_factor if counters["step"] < counters.get("cooldown_until", 0) else 1.0


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no NaN
