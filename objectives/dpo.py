"""--objective dpo: Direct Preference Optimisation (Rafailov et al. 2023), as TRL's DPOTrainer.

The last stage sums each sequence's log-probability over its response tokens (without holding
all logits: objectives.loss.sequence_logps), and the loss of a pair is
``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` (label smoothing: the conservative
form), with TRL's metrics. The reference log-probs ``ref`` come from objectives.reference:
precomputed once, or each step's forward of a frozen copy.
"""

from __future__ import annotations

import torch
from torch import nn

from comm.process_group import Communicator
from data.stream import Batch, TokenStream
from objectives.base import RunContext, RunForward, StepLoss, Targets
from objectives.pairs import PairLoss, PairObjective, preference_losses, stage_logps
from objectives.reference import DpoReference

# TRL's names: the rewards are beta times the log-ratio to the reference
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")  # fmt: skip


class DpoLoss(PairLoss):
    METRICS = DPO_METRICS

    def __init__(self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device, beta: float,
                 smoothing: float) -> None:  # fmt: skip
        super().__init__(normalizer, device)
        self.stage, self.chunk, self.beta, self.smoothing = stage, chunk, beta, smoothing

    def __call__(self, out: torch.Tensor, targets: Targets) -> torch.Tensor:
        """The summed loss of these pairs over the normalizer; ``targets``: the sequences' labels
        (chosen and rejected alternating) and their ``reference`` log-probs."""
        logps = stage_logps(self.stage, out, targets["labels"], self.chunk)
        return self.loss(logps, targets["reference"])

    def loss(self, logps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """From each sequence's log-prob and the reference's, (2 * pairs,) chosen and rejected alternating."""
        beta = self.beta
        chosen, rejected = logps[0::2], logps[1::2]
        chosen_ratio, rejected_ratio = chosen - reference[0::2], rejected - reference[1::2]
        margin = beta * (chosen_ratio - rejected_ratio)
        losses = preference_losses(margin, self.smoothing)
        rewards_c, rewards_r = beta * chosen_ratio, beta * rejected_ratio
        self._add([rewards_c, rewards_r, (rewards_c > rewards_r).float(), rewards_c - rewards_r, chosen, rejected])
        return losses.sum() / self.normalizer


class Dpo(PairObjective):
    name = "dpo"

    def __init__(self, beta: float, smoothing: float, per_step: bool) -> None:
        """``per_step``: --dpo-reference frozen (else precomputed)."""
        self.beta, self.smoothing, self.per_step = beta, smoothing, per_step
        self.reference: DpoReference | None = None  # made by ``start``

    def start(self, stage: nn.Module, run: RunForward, context: RunContext) -> None:
        """Before any checkpoint loads: ``stage`` still holds the starting weights (the reference)."""
        self.reference = DpoReference(context, self.per_step, stage, run)

    @property
    def needs_preparing(self) -> bool:
        return not self.per_step  # --dpo-reference precomputed: every pair's log-probs, once

    @property
    def extra_bytes(self) -> int:
        return self.reference.extra_bytes if self.reference is not None else 0

    def targets(self, batch: Batch, rows: slice, slot: int, first_file: int, pad_id: int) -> Targets:
        reference = self.reference.rows(batch, slot, rows, first_file) if self.reference is not None else None
        targets = super().targets(batch, rows, slot, first_file, pad_id)
        return targets if reference is None else {**targets, "reference": reference}

    def probe_targets(self, rows: int, seq: int, vocab: int, device: torch.device) -> Targets:
        return {**super().probe_targets(rows, seq, vocab, device), "reference": torch.zeros(rows, device=device)}

    def step_loss(self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device) -> StepLoss:
        return DpoLoss(stage, normalizer, chunk, device, self.beta, self.smoothing)

    def before_pass(self, batch: Batch | None, slots: range, is_last: bool) -> None:
        if self.reference.per_step:  # --dpo-reference frozen: this batch's reference log-probs first
            self.reference.forward(batch, slots, is_last)

    def prepare(self, comm: Communicator, step: int, identity: dict, data: TokenStream | None, slots: range) -> None:
        self.reference.prepare(comm, step, identity, data, slots)
