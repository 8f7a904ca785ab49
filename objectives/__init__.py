"""What the last stage trains for, one file per objective (objectives.base says what each gives
the trainer): next-token loss (lm), DPO (dpo) and SimPO (simpo) on preference pairs, a reward
model (reward), GRPO on completions it generates (grpo). ``make_objective`` is the registry:
adding one is a file, a line here and its tests."""

from __future__ import annotations

from objectives.base import Objective, RunContext, StepLoss, Targets
from objectives.config import ObjectiveConfig
from objectives.dpo import Dpo
from objectives.grpo import Grpo
from objectives.lm import NextToken
from objectives.reward import Reward
from objectives.simpo import Simpo

__all__ = ["Objective", "ObjectiveConfig", "RunContext", "StepLoss", "Targets", "make_objective"]


def make_objective(cfg: ObjectiveConfig, micro_batch_size: int = 1) -> Objective:
    """The objective ``--objective`` (and for dpo ``--dpo-loss``) names, with its settings."""
    if cfg.name == "grpo":
        return Grpo(cfg.grpo, micro_batch_size)
    if cfg.name == "reward":
        return Reward()
    if cfg.name == "dpo" and cfg.loss == "simpo":
        return Simpo(cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
    if cfg.name == "dpo":
        return Dpo(cfg.beta, cfg.label_smoothing, per_step=cfg.reference == "frozen")
    return NextToken()
