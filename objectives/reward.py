"""--objective reward: a reward model, as TRL's RewardTrainer and ColossalAI's reward stage train it.

The last stage scores each sequence with a scalar head (``score``, hidden size to 1, no bias: HF's
ForSequenceClassification head) on the final norm's output at its last real token, where HF's
classifiers pool (``last_tokens``); a pair's loss is ``-log sigmoid(r_chosen - r_rejected)``
(ColossalAI's ``log(1 + exp(r_rejected - r_chosen))`` is the same function). The output layer is
not used: it stays as loaded, frozen, and a tied one is no longer tied. The score head is a part
of its own (``score.safetensors``), trained whole under LoRA; a folder without one (a causal LM)
starts it as HF does, normal with the config's ``initializer_range``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.stream import Batch
from modules import SCORE_PART
from objectives.base import StepLoss, Targets
from objectives.pairs import PairLoss, PairObjective


def score_head(config: object) -> nn.Module:
    return nn.Linear(config.hidden_size, 1, bias=False)


def last_tokens(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Where HF's sequence classifiers pool each row: its rightmost token that is not ``pad_id``."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


class RewardLoss(PairLoss):
    METRICS = ("accuracy", "margin", "mean_reward")  # TRL's RewardTrainer's names

    def __init__(self, stage: nn.Module, normalizer: float, device: torch.device) -> None:
        super().__init__(normalizer, device)
        self.stage = stage  # the last stage's score head scores (the other stages never call this)

    def __call__(self, out: torch.Tensor, targets: Targets) -> torch.Tensor:
        """``out``: the final norm's output; ``targets["scored_at"]``: each sequence's last real token."""
        last = out[torch.arange(out.shape[0], device=out.device), targets["scored_at"]]
        return self.loss(getattr(self.stage, SCORE_PART)(last).squeeze(-1).float())

    def loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """From the sequences' scores, (2 * pairs,) chosen and rejected alternating."""
        chosen, rejected = rewards[0::2], rewards[1::2]
        losses = -F.logsigmoid(chosen - rejected)
        self._add([(chosen > rejected).float(), chosen - rejected, (chosen + rejected) / 2])
        return losses.sum() / self.normalizer


class Reward(PairObjective):
    name = "reward"
    reads_logits = False
    uses_output_layer = False
    parts = {SCORE_PART: score_head}  # noqa: RUF012 - read only

    def targets(self, batch: Batch, rows: slice, slot: int, first_file: int, pad_id: int) -> Targets:
        return {"scored_at": last_tokens(batch.input_ids[rows], pad_id)}

    def probe_targets(self, rows: int, seq: int, vocab: int, device: torch.device) -> Targets:
        return {"scored_at": torch.zeros(rows, dtype=torch.long, device=device)}

    def step_loss(self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device) -> StepLoss:
        return RewardLoss(stage, normalizer, device)
