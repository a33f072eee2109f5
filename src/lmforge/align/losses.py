"""Preference losses on sequence log-probabilities and reward scores: DPO and its family, and Bradley-Terry.

Every DPO-family loss takes per-pair log-probabilities of the chosen and rejected replies under the policy and
(except SimPO) under the reference model, and returns per-pair losses with the implicit rewards
beta * (policy - reference) that the logs show. Definitions follow the papers as TRL implements them:
- sigmoid (DPO, Rafailov et al. 2023), with conservative label smoothing;
- robust (Chowdhury et al. 2024): unbiased under label noise `label_smoothing`;
- hinge (SLiC, Zhao et al. 2023); ipo (Azar et al. 2023, on length-averaged log-probabilities);
- exo_pair (Ji et al. 2024); nca_pair (Chen et al. 2024); sppo_hard (Wu et al. 2024);
- apo_zero / apo_down (D'Oosterlinck et al. 2024);
- simpo (Meng et al. 2024): reference-free, length-averaged log-probabilities, target margin gamma.
`bradley_terry` is the reward-model loss: -log sigmoid(r_chosen - r_rejected - margin), optionally plus
center * (r_chosen + r_rejected)^2, which keeps rewards centred on zero (Eisenstein et al. 2023).
This module holds no model code: tensors in, tensors out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.align.settings import LOSSES


@dataclass
class LossConfig:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid / robust / exo_pair / simpo: the assumed rate of flipped labels
    gamma: float = 0.5  # simpo: the target reward margin


@dataclass
class PreferenceTerms:
    losses: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor  # (B,) detached


def preference_loss(
    cfg: LossConfig, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None
) -> PreferenceTerms:
    """Per-pair losses from (B,) log-probabilities (already length-averaged for LENGTH_AVERAGED losses)."""
    beta, ls = cfg.beta, cfg.label_smoothing
    if cfg.loss == "simpo":
        h = chosen - rejected - cfg.gamma / beta
        losses = -F.logsigmoid(beta * h) * (1 - ls) - F.logsigmoid(-beta * h) * ls
        return PreferenceTerms(losses, beta * chosen.detach(), beta * rejected.detach())
    assert ref_chosen is not None and ref_rejected is not None, f"{cfg.loss} needs reference log-probabilities"
    c, r = chosen - ref_chosen, rejected - ref_rejected  # each reply's log-ratio to the reference
    h = c - r
    if cfg.loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - ls) - F.logsigmoid(-beta * h) * ls
    elif cfg.loss == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - ls) + F.logsigmoid(-beta * h) * ls) / (1 - 2 * ls)
    elif cfg.loss == "hinge":
        losses = torch.relu(1 - beta * h)
    elif cfg.loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif cfg.loss == "exo_pair":
        eps = ls or 1e-3
        losses = (beta * h).sigmoid() * (F.logsigmoid(beta * h) - math.log(1 - eps)) + (-beta * h).sigmoid() * (
            F.logsigmoid(-beta * h) - math.log(eps)
        )
    elif cfg.loss == "nca_pair":
        losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    elif cfg.loss == "sppo_hard":
        losses = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    elif cfg.loss == "apo_zero":
        losses = (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    elif cfg.loss == "apo_down":
        losses = torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * h))
    else:
        raise ValueError(f"unknown preference loss {cfg.loss!r}; choose from {', '.join(LOSSES)}")
    return PreferenceTerms(losses, beta * c.detach(), beta * r.detach())


def bradley_terry(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None, center: float = 0.0) -> Tensor:
    """Per-pair reward-model losses from (B,) scores."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    losses = -F.logsigmoid(diff)
    if center:
        losses = losses + center * (chosen + rejected) ** 2
    return losses
