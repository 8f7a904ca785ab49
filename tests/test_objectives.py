"""Each objective's loss closure (objectives/) against its formula written out here, on a last
stage of a few random weights: what ``step_loss(...)(output, targets)`` returns for a micro-batch,
the statistics it sums and the metrics row they give, what the objective counts and the targets
it makes from a batch. No process group, no model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from data.stream import IGNORE_INDEX, Batch
from modules.common import Head
from objectives import make_objective
from objectives.config import ObjectiveConfig
from objectives.dpo import Dpo, DpoLoss
from objectives.lm import NextToken
from objectives.reward import Reward, RewardLoss, last_tokens
from objectives.simpo import Simpo, SimpoLoss

HIDDEN, VOCAB, SEQ = 8, 13, 7
CPU = torch.device("cpu")


class LastStage(nn.Module):
    """What an objective reads of a last stage: its head (norm, output layer, soft-cap) and a
    reward model's score head."""

    def __init__(self, softcap: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.head = Head("norm", nn.LayerNorm(HIDDEN), "lm_head", nn.Linear(HIDDEN, VOCAB, bias=False), softcap)
        self.score = nn.Linear(HIDDEN, 1, bias=False)


def labels_of(rows: int, prompt: int = 2) -> torch.Tensor:
    """Random targets with a prompt (and for the second row padding) never scored."""
    labels = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(rows))
    labels[:, :prompt] = IGNORE_INDEX
    labels[1, -2:] = IGNORE_INDEX
    return labels


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Each scored token's log-probability, written out: log(exp(z_target) / sum exp(z))."""
    out = []
    for row in range(labels.shape[0]):
        values = []
        for t in range(1, SEQ):
            if labels[row, t] != IGNORE_INDEX:
                z = logits[row, t - 1].double()
                values.append(float(z[labels[row, t]] - torch.logsumexp(z, 0)))
        out.append(values)
    return out


@pytest.mark.parametrize("chunk", [0, 3])  # the logits, or the final norm's output projected 3 tokens at a time
def test_next_token_loss_is_the_mean_cross_entropy_of_the_trained_tokens(chunk: int) -> None:
    stage, labels = LastStage(softcap=5.0), labels_of(3)
    hidden = torch.randn(3, SEQ, HIDDEN)
    logits = stage.head(hidden)
    objective = NextToken()
    for made in (objective, Dpo(0.1, 0.0, True), Simpo(2.0, 0.5, 0.0), Reward()):  # on a stage without a head too
        made.step_loss(nn.Module(), 1.0, chunk, CPU)
    normalizer = objective.count(labels)
    assert normalizer == sum(len(row) for row in token_logps(logits, labels)) == 3 * (SEQ - 2) - 2
    loss_fn = objective.step_loss(stage, float(normalizer), chunk, CPU)
    out = stage.head.normed(hidden) if chunk else logits
    loss = loss_fn(out, {"labels": labels})
    expected = -sum(sum(row) for row in token_logps(logits, labels)) / normalizer
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn.totals is None  # next-token training reports the loss alone
    row = objective.evaluation_row(2.0 * normalizer, float(normalizer), loss_fn, [])
    assert row == pytest.approx({"valid.loss": 2.0, "valid.perplexity": math.exp(2.0)})


def pair_logps(stage: LastStage, hidden: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return [sum(row) for row in token_logps(stage.head(hidden), labels)]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("chunk", [0, 4])
def test_dpo_loss_from_the_sequences_log_probs_and_the_references(chunk: int) -> None:
    beta, smoothing = 0.2, 0.1
    stage, labels = LastStage(), labels_of(4)
    hidden = torch.randn(4, SEQ, HIDDEN)
    reference = torch.tensor([-11.0, -12.5, -9.0, -14.0])  # chosen, rejected, chosen, rejected
    objective = Dpo(beta, smoothing, per_step=True)
    assert objective.count(labels) == 2  # the mean is over pairs
    loss_fn = objective.step_loss(stage, 2.0, chunk, CPU)
    out = stage.head.normed(hidden) if chunk else stage.head(hidden)
    loss = loss_fn(out, {"labels": labels, "reference": reference})

    logps = pair_logps(stage, hidden, labels)
    ratios = [lp - ref for lp, ref in zip(logps, reference.tolist(), strict=True)]
    margins = [beta * (ratios[0] - ratios[1]), beta * (ratios[2] - ratios[3])]
    expected = sum(-log_sigmoid(m) * (1 - smoothing) - log_sigmoid(-m) * smoothing for m in margins) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    rewards = [beta * r for r in ratios]
    row = loss_fn.row(loss_fn.totals.tolist())
    assert row == pytest.approx({
        "rewards/chosen": (rewards[0] + rewards[2]) / 2, "rewards/rejected": (rewards[1] + rewards[3]) / 2,
        "rewards/accuracies": ((rewards[0] > rewards[1]) + (rewards[2] > rewards[3])) / 2,
        "rewards/margins": (rewards[0] - rewards[1] + rewards[2] - rewards[3]) / 2,
        "logps/chosen": (logps[0] + logps[2]) / 2, "logps/rejected": (logps[1] + logps[3]) / 2,
    }, rel=1e-5, abs=1e-6)  # fmt: skip


def test_dpo_loss_values_and_direction_from_given_log_probs() -> None:
    beta, smoothing = 0.2, 0.1
    logps = torch.tensor([-3.0, -5.0, -4.0, -2.0], requires_grad=True)  # chosen, rejected, chosen, rejected
    reference = torch.tensor([-3.5, -4.0, -4.0, -3.0])
    dpo = DpoLoss(LastStage(), 2.0, 0, CPU, beta, smoothing)
    loss = dpo.loss(logps, reference)
    margins = [beta * ((-3.0 + 3.5) - (-5.0 + 4.0)), beta * ((-4.0 + 4.0) - (-2.0 + 3.0))]  # 0.3, -0.2
    expected = sum(-log_sigmoid(m) * (1 - smoothing) - log_sigmoid(-m) * smoothing for m in margins) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    row = dpo.row(dpo.totals.tolist())
    assert row == pytest.approx({"rewards/chosen": beta * 0.25, "rewards/rejected": beta * 0.0,
                                 "rewards/accuracies": 0.5, "rewards/margins": 0.05, "logps/chosen": -3.5,
                                 "logps/rejected": -3.5})  # fmt: skip
    loss.backward()
    assert logps.grad[0] < 0 < logps.grad[1]  # descending raises the chosen, lowers the rejected


def test_simpo_loss_from_each_responses_mean_log_prob() -> None:
    beta, gamma = 2.0, 0.5
    stage, labels = LastStage(), labels_of(4)
    hidden = torch.randn(4, SEQ, HIDDEN)
    objective = Simpo(beta, gamma, 0.0)
    loss_fn = objective.step_loss(stage, 2.0, 0, CPU)
    loss = loss_fn(stage.head(hidden), {"labels": labels})
    means = [sum(row) / len(row) for row in token_logps(stage.head(hidden), labels)]
    margins = [beta * (means[0] - means[1]) - gamma, beta * (means[2] - means[3]) - gamma]
    assert loss.item() == pytest.approx(sum(-log_sigmoid(m) for m in margins) / 2, rel=1e-5)
    row = loss_fn.row(loss_fn.totals.tolist())
    assert row["logps/chosen"] == pytest.approx((means[0] + means[2]) / 2, rel=1e-5)
    assert row["rewards/rejected"] == pytest.approx(beta * (means[1] + means[3]) / 2, rel=1e-5)
    # from given values: mean log-probs -2, -4, -1, -3
    simpo = SimpoLoss(stage, 2.0, 0, CPU, beta, gamma, 0.0)
    value = simpo.loss(torch.tensor([-6.0, -4.0, -3.0, -9.0]), torch.tensor([3, 1, 3, 3]))
    assert value.item() == pytest.approx(math.log1p(math.exp(-3.5)), rel=1e-6)  # both margins 3.5
    assert simpo.row(simpo.totals.tolist())["rewards/accuracies"] == 1.0


def test_reward_loss_scores_each_sequence_at_its_last_real_token() -> None:
    stage = LastStage()
    pad = 0
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0], [5, 0, 6, 8, 9, 0, 0], [4, 4, 4, 4, 4, 4, 4], [3, 2, 1, 0, 0, 0, 0]])
    batch = Batch(ids, ids.clone(), (0, 0, 0, 0))
    objective = Reward()
    targets = objective.targets(batch, slice(0, 4), 0, 0, pad)
    # the rightmost token that is not padding: with pad = EOS, the token before the closing EOS
    assert targets["scored_at"].tolist() == [2, 4, 6, 2] == last_tokens(ids, pad).tolist()
    normed = torch.randn(4, SEQ, HIDDEN)  # the final norm's output: a reward model reads no logits
    assert not objective.reads_logits and not objective.uses_output_layer
    loss_fn = objective.step_loss(stage, 2.0, 0, CPU)
    loss = loss_fn(normed, targets)
    scores = [float(stage.score(normed[k, at])) for k, at in enumerate(targets["scored_at"].tolist())]
    expected = (math.log1p(math.exp(scores[1] - scores[0])) + math.log1p(math.exp(scores[3] - scores[2]))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    row = loss_fn.row(loss_fn.totals.tolist())
    assert row == pytest.approx({"accuracy": ((scores[0] > scores[1]) + (scores[2] > scores[3])) / 2,
                                 "margin": (scores[0] - scores[1] + scores[2] - scores[3]) / 2,
                                 "mean_reward": sum(scores) / 4}, rel=1e-5)  # fmt: skip
    # from given scores: ColossalAI's log(1 + exp(r_r - r_c)) is -log sigmoid(r_c - r_r)
    reward = RewardLoss(stage, 2.0, CPU)
    value = reward.loss(torch.tensor([0.5, -0.25, -1.0, 0.0]))
    assert value.item() == pytest.approx((math.log1p(math.exp(-0.75)) + math.log1p(math.exp(1.0))) / 2, rel=1e-6)
    assert reward.row(reward.totals.tolist()) == pytest.approx({"accuracy": 0.5, "margin": -0.125,
                                                                "mean_reward": -0.1875})  # fmt: skip


def test_the_registry_names_each_objective_by_its_flags() -> None:
    assert type(make_objective(ObjectiveConfig())) is NextToken
    assert type(make_objective(ObjectiveConfig("reward"))) is Reward
    dpo = make_objective(ObjectiveConfig("dpo", beta=0.3, reference="frozen"))
    assert type(dpo) is Dpo and dpo.beta == 0.3 and dpo.per_step and not dpo.needs_preparing
    assert make_objective(ObjectiveConfig("dpo")).needs_preparing  # precomputed: one pass before training
    simpo = make_objective(ObjectiveConfig("dpo", loss="simpo", simpo_gamma=0.7))
    assert type(simpo) is Simpo and simpo.gamma == 0.7
    # the schedule sees none of them: targets are a dict the loss alone reads
    batch = Batch(torch.ones(4, SEQ, dtype=torch.long), labels_of(4), (0, 0, 0, 0))
    assert sorted(NextToken().targets(batch, slice(0, 2), 0, 0, 0)) == ["labels"]
    assert torch.equal(NextToken().targets(batch, slice(2, 4), 1, 0, 0)["labels"], batch.labels[2:4])
