"""--objective lm: next-token cross-entropy over the trained tokens (text, completions, the
assistant's turns), the mean over the step's trained tokens; perplexity in evaluation."""

from __future__ import annotations

import math

import torch
from torch import nn

from objectives.base import Objective, StepLoss, Targets
from objectives.loss import chunked_token_loss, token_loss


class TokenLoss(StepLoss):
    def __init__(self, stage: nn.Module, normalizer: float, chunk: int) -> None:
        self.stage, self.normalizer, self.chunk = stage, normalizer, chunk  # the last stage's (others never call)

    def __call__(self, out: torch.Tensor, targets: Targets) -> torch.Tensor:
        if self.chunk:  # the last stage handed over the final norm's output, not logits
            head = self.stage.head
            return chunked_token_loss(out, head.output, targets["labels"], self.normalizer, self.chunk, head.softcap)
        return token_loss(out, targets["labels"], self.normalizer)


class NextToken(Objective):
    name = "lm"

    def step_loss(self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device) -> StepLoss:
        return TokenLoss(stage, normalizer, chunk)

    def evaluation_row(self, loss: float, count: float, loss_fn: StepLoss, totals: list[float]) -> dict[str, float]:
        mean = loss / max(1.0, count)
        return {"valid.loss": mean, "valid.perplexity": math.exp(min(mean, 700.0))}
