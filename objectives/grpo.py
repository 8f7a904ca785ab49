"""GRPO's loss (Shao et al. 2024) and its variants, as TRL's GRPOTrainer computes them.

Each completion's tokens are scored against the policy that sampled them: the importance ratio
``exp(logp - old_logp)`` per token, or per sequence (GSPO: the mean of the completion's log-ratios),
clipped to ``[1 - epsilon, 1 + epsilon_high]`` (DAPO's clip-higher where ``epsilon_high`` is
larger), times the completion's group-normalised advantage; the loss is ``-min`` of the clipped
and unclipped terms, plus ``beta`` times the k3 estimate of the KL to a reference,
``exp(ref - logp) - (ref - logp) - 1`` (times the ratio, TRL's default bias correction).

How the per-token losses average (``--loss-type``), as TRL's each comes out over a global batch
split into micro-batches and replicas:

- ``grpo``: each completion's mean over its tokens, then the mean over the step's completions;
- ``bnpo``: each micro-batch's mean over its tokens, then the mean over the step's micro-batches;
- ``dr_grpo``: the sum over the step's tokens over completions x ``--max-completion-length``;
- ``dapo`` (TRL's default): the sum over the step's tokens over their number.

``GrpoLoss`` is the last stage's loss of one step: the trainer divides each micro-batch's part by
the step's ``normalizer``, the sum of ``GrpoSettings.count`` over the step's micro-batches (on all
replicas), so the step's gradient is exactly the global batch's.
"""

from __future__ import annotations

import torch
from torch import nn

from data.stream import IGNORE_INDEX, Batch
from objectives.base import Objective, StepLoss, Targets
from objectives.config import GrpoSettings
from objectives.loss import token_logps
from objectives.rewards import load_reward_function
from objectives.rollouts import rollout_row

# TRL's names, means over the step's completion tokens (the clip ratios count a token where its
# ratio left the clip range on the side its advantage would push it further)
GRPO_METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def token_losses(
    logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
    mask: torch.Tensor, settings: GrpoSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The per-token loss (rows, T) of completions whose tokens' log-probs are ``logps`` (rows, T)
    under the policy trained, ``old_logps`` under the one that sampled them (None: this one, so the
    ratio is 1 with its gradient), ``ref_logps`` under the reference (for ``beta`` > 0), with one
    advantage per row; and the statistics of GRPO_METRICS, per token (rows, T) or, for the clip
    ratios at the sequence level, per completion (rows, 1)."""
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if settings.importance_sampling_level == "sequence":  # GSPO: one ratio per completion
        tokens = mask.sum(-1).clamp(min=1.0)
        log_ratio = ((log_ratio * mask).sum(-1) / tokens).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - settings.epsilon, 1 + settings.clip_high)
    advantages = advantages.unsqueeze(-1)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    with torch.no_grad():  # (rows, 1) at the sequence level: a mean over completions, as TRL's
        low = ((ratio < 1 - settings.epsilon) & (advantages < 0)).float()
        high = ((ratio > 1 + settings.clip_high) & (advantages > 0)).float()
        stats = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
                 "clip_ratio/region_mean": torch.maximum(low, high)}  # fmt: skip
    if settings.beta:
        if ref_logps is None:
            raise ValueError("--beta above 0 needs the reference's log-probs of every completion token")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if settings.kl_ratio_correction:
            kl = kl * ratio
        losses = losses + settings.beta * kl
        stats["kl"] = kl.detach()
    return losses.expand_as(logps), stats


def reduced(losses: torch.Tensor, mask: torch.Tensor, settings: GrpoSettings) -> torch.Tensor:
    """One micro-batch's share of the step's loss before the step's normalizer divides it."""
    masked = losses * mask
    if settings.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    if settings.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    return masked.sum()


class GrpoLoss(StepLoss):
    """The last stage's GRPO loss of one step. ``targets``: ``labels`` (the completion tokens,
    IGNORE_INDEX elsewhere), ``advantages`` (rows,), and where there are any ``old_logps`` and
    ``ref_logps`` (rows, seq - 1). ``totals``: each of GRPO_METRICS's sum and count, over the
    completion tokens or, per completion, over the completions."""

    def __init__(
        self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device, settings: GrpoSettings,
        rollout: torch.Tensor | None = None, names: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        """``rollout``: the step's rollout sums (objectives.rollouts) to report beside the loss's,
        of reward functions ``names``."""
        self.stage, self.normalizer, self.chunk, self.settings = stage, normalizer, chunk, settings
        self.names, self.rolled = tuple(names), 0 if rollout is None else len(rollout)
        self.totals = torch.zeros(2 * len(GRPO_METRICS) + self.rolled, dtype=torch.float64, device=device)
        if rollout is not None:
            self.totals[: self.rolled] = rollout.to(self.totals)

    def __call__(self, out: torch.Tensor, targets: Targets) -> torch.Tensor:
        labels = targets["labels"]
        head = self.stage.head
        output = head.output if self.chunk else None
        logps = token_logps(out, labels, output, self.chunk, head.softcap, self.settings.temperature or 1.0)
        mask = (labels[:, 1:] != IGNORE_INDEX).float()
        losses, stats = token_losses(logps, targets.get("old_logps"), targets.get("ref_logps"),
                                     targets["advantages"], mask, self.settings)  # fmt: skip
        with torch.no_grad():
            sums = []
            for name in GRPO_METRICS:
                value = stats.get(name)
                if value is None:
                    sums += [mask.new_zeros(()), mask.new_zeros(())]
                elif value.shape[-1] == 1:  # one per completion
                    sums += [value.sum(), mask.new_tensor(float(value.shape[0]))]
                else:
                    sums += [(value * mask).sum(), mask.sum()]
            self.totals[self.rolled :] += torch.stack(sums).to(self.totals)
        return reduced(losses, mask, self.settings) / self.normalizer

    def row(self, totals: list[float], prefix: str = "") -> dict[str, float]:
        names = GRPO_METRICS if self.settings.beta else GRPO_METRICS[1:]
        at = {name: self.rolled + 2 * i for i, name in enumerate(GRPO_METRICS)}
        row = {prefix + name: totals[at[name]] / max(1.0, totals[at[name] + 1]) for name in names}
        if self.rolled:
            row.update({prefix + k: v for k, v in rollout_row(totals[: self.rolled], self.names).items()})
        return row


class Grpo(Objective):
    """--objective grpo: each step's completions are generated through the pipeline from its
    prompts (the trainer's rollout, trainer.rollout), scored by the reward functions, and trained
    on with GrpoLoss; the metrics add TRL's rollout figures (objectives.rollouts)."""

    name = "grpo"
    generates = True

    def __init__(self, settings: GrpoSettings, micro_batch_size: int) -> None:
        self.settings, self.micro = settings, micro_batch_size
        self.functions = [load_reward_function(spec) for spec in settings.reward_funcs]
        self.rollout: torch.Tensor | None = None  # this replica's rollout sums of the step (the last stage)

    def targets(self, batch: Batch, rows: slice, slot: int, first_file: int, pad_id: int) -> Targets:
        return {"labels": batch.labels[rows], "advantages": batch.advantages[rows]}

    def count(self, labels: torch.Tensor) -> float:
        mask = labels[:, 1:] != IGNORE_INDEX
        return sum(self.settings.count(mask[i : i + self.micro]) for i in range(0, len(mask), self.micro))

    def step_count(self, batch: Batch, counted: float) -> float:
        return batch.total if getattr(batch, "total", None) is not None else counted

    def probe_targets(self, rows: int, seq: int, vocab: int, device: torch.device) -> Targets:
        return {**super().probe_targets(rows, seq, vocab, device), "advantages": torch.zeros(rows, device=device)}

    def step_loss(self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device) -> StepLoss:
        return GrpoLoss(stage, normalizer, chunk, device, self.settings, self.rollout, [f.name for f in self.functions])
