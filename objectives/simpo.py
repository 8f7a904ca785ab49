"""--objective dpo --dpo-loss simpo: SimPO (Meng et al. 2024), as TRL's CPOTrainer with the SimPO
loss. No reference model: each response's log-probability is divided by its scored tokens, and
a pair's loss is ``-log sigmoid(beta * (mean_c - mean_r) - gamma)`` (label smoothing as DPO's).
The rows report TRL's names with the length-normalised values: ``rewards/*`` are beta times the
mean log-probs, ``logps/*`` the mean log-probs."""

from __future__ import annotations

import torch
from torch import nn

from objectives.base import StepLoss, Targets
from objectives.dpo import DPO_METRICS
from objectives.pairs import PairLoss, PairObjective, preference_losses, scored_tokens, stage_logps


class SimpoLoss(PairLoss):
    METRICS = DPO_METRICS

    def __init__(self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device, beta: float,
                 gamma: float, smoothing: float) -> None:  # fmt: skip
        super().__init__(normalizer, device)
        self.stage, self.chunk, self.beta, self.gamma, self.smoothing = stage, chunk, beta, gamma, smoothing

    def __call__(self, out: torch.Tensor, targets: Targets) -> torch.Tensor:
        labels = targets["labels"]
        return self.loss(stage_logps(self.stage, out, labels, self.chunk), scored_tokens(labels))

    def loss(self, logps: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """From each sequence's summed log-prob and its scored tokens, chosen and rejected alternating."""
        beta = self.beta
        logps = logps / scored
        chosen, rejected = logps[0::2], logps[1::2]
        margin = beta * (chosen - rejected) - self.gamma
        losses = preference_losses(margin, self.smoothing)
        rewards_c, rewards_r = beta * chosen, beta * rejected
        self._add([rewards_c, rewards_r, (rewards_c > rewards_r).float(), rewards_c - rewards_r, chosen, rejected])
        return losses.sum() / self.normalizer


class Simpo(PairObjective):
    name = "simpo"

    def __init__(self, beta: float, gamma: float, smoothing: float) -> None:
        self.beta, self.gamma, self.smoothing = beta, gamma, smoothing

    def step_loss(self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device) -> StepLoss:
        return SimpoLoss(stage, normalizer, chunk, device, self.beta, self.gamma, self.smoothing)
