"""What the objectives on preference pairs share (dpo, simpo, reward): the rows are pairs, each
a chosen then a rejected sequence of one micro-batch, and the loss and the metrics are means over
the step's pairs; each sequence's summed log-probability of its scored tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.stream import IGNORE_INDEX
from objectives.base import Objective, StepLoss
from objectives.loss import sequence_logps


class PairLoss(StepLoss):
    """A loss over pairs whose ``totals`` sum the step's ``METRICS``, then the number of pairs."""

    METRICS: tuple[str, ...] = ()

    def __init__(self, normalizer: float, device: torch.device) -> None:
        self.normalizer = normalizer
        self.totals = torch.zeros(len(self.METRICS) + 1, dtype=torch.float32, device=device)

    def _add(self, stats: list[torch.Tensor]) -> None:
        """Add each statistic's sum over these pairs (no graph is kept), and the pairs."""
        with torch.no_grad():
            pairs = torch.tensor(float(len(stats[0])))
            self.totals += torch.stack([s.sum() for s in stats] + [pairs]).to(self.totals)

    def row(self, totals: list[float], prefix: str = "") -> dict[str, float]:
        """The metrics from summed ``totals`` (over micro-batches and replicas), means over pairs."""
        pairs = max(1.0, totals[-1])
        return {prefix + name: value / pairs for name, value in zip(self.METRICS, totals, strict=False)}


class PairObjective(Objective):
    pairs = True

    def count(self, labels: torch.Tensor) -> int:
        """The loss is a mean over pairs: two rows each."""
        return labels.shape[0] // 2


def stage_logps(stage: nn.Module, out: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each sequence's summed log-probability of its scored tokens, (rows,) in fp32: from the
    logits ``out``, or chunked through the output layer of ``stage``, the module that computed
    ``out`` (the trained stage, or DPO's frozen copy of it: never another's layer)."""
    head = stage.head
    return sequence_logps(out, labels, head.output if chunk else None, chunk, head.softcap)


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's scored tokens (rows,): those with a target and a token before them."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def preference_losses(margin: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Each pair's ``-log sigmoid(margin)``; with label smoothing ``e`` (conservative DPO), the
    mean of that and of the flipped pair's loss, weighted ``1 - e`` and ``e``."""
    return -F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing
