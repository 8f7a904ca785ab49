"""A GRPO step's rollouts: its prompts, each repeated ``--num-generations`` times, into micro-batches
to generate from; the completions back into the sequences the step trains on; their rewards.

A slot of ``--batch-size`` completions holds whole groups (a prompt's completions, consecutive).
Each sequence is the prompt's tokens then the completion's, through its end-of-sequence token,
right-padded to ``--seq-length``: the completion's tokens are the trained ones. TRL's sequences
are left-padded prompts then completions; the same tokens at positions shifted alike, which a
rotary model scores the same (learned positions, GPT-2's, would differ: the tests compare rotary
models). Every replica's rows sit at its slots' places in a batch laid out as the global one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data.stream import IGNORE_INDEX, Batch
from generation.engine import PromptBatch
from generation.prompts import Prompt
from objectives.config import GrpoSettings
from objectives.rewards import RewardFunction, advantages, nanstd, score


@dataclass(frozen=True)
class RolloutBatch(Batch):
    """The sequences a GRPO step trains on, each completion's advantage beside it; ``total``:
    the step's loss normaliser summed over the replicas where it depends on what they generated."""

    advantages: torch.Tensor | None = None  # (rows,)
    total: float | None = None


def replica_prompts(
    draw: Sequence[Prompt], generations: int, slots: Sequence[int], batch_size: int
) -> tuple[list[Prompt], list[int]]:
    """The prompt of each of this replica's completions, slot by slot (a prompt repeated for its
    group), and the row each completion has in the global batch."""
    per_slot = batch_size // generations
    prompts = [p for slot in slots for p in draw[slot * per_slot : (slot + 1) * per_slot] for _ in range(generations)]
    return prompts, [row for slot in slots for row in range(slot * batch_size, (slot + 1) * batch_size)]


def generation_batches(prompts: Sequence[Prompt], micro: int, pad_id: int, device: torch.device) -> list[PromptBatch]:
    """Micro-batches of ``micro`` prompts to generate from (a slot holds whole micro-batches)."""
    return [PromptBatch.left_padded([p.ids for p in prompts[i : i + micro]], pad_id, device)
            for i in range(0, len(prompts), micro)]  # fmt: skip


def training_rows(
    prompts: Sequence[Prompt], generated: list[tuple[list[int], bool]], places: Sequence[int],
    mask_truncated: bool, total_rows: int, seq_length: int, pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(input_ids, labels) laid out as the global batch, each completion after its prompt at its
    row of ``places``; ``mask_truncated``: one cut at the length trains nothing."""
    input_ids = torch.full((total_rows, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((total_rows, seq_length), IGNORE_INDEX, dtype=torch.long)
    for prompt, (completion, cut), row in zip(prompts, generated, places, strict=True):
        start, sequence = len(prompt.ids), [*prompt.ids, *completion]
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        if not (cut and mask_truncated):
            labels[row, start : len(sequence)] = torch.tensor(completion)
    return input_ids, labels


# the rollouts' sums over a step (added over the replicas): rewards, their squares and how many
# were scored; per function the same; groups whose rewards were all alike, groups; completion
# tokens, completions cut at the length, completions
def rollout_sums(
    functions: Sequence[RewardFunction], settings: GrpoSettings, prompts: Sequence[Prompt],
    generated: list[tuple[list[int], bool]], tokenizer: object,
) -> tuple[list[dict], torch.Tensor, torch.Tensor]:  # fmt: skip
    """This replica's completions (of ``prompts``, groups together) as rollouts.jsonl rows
    (without the step), their advantages, and its rollout sums."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in generated]
    # a conversation's completion is the assistant's message, as TRL hands it to reward functions
    answers = [[{"role": "assistant", "content": t}] if isinstance(p.prompt, list) else t
               for p, t in zip(prompts, texts, strict=True)]  # fmt: skip
    keys = sorted({k for p in prompts for k in p.columns})
    columns = {k: [p.columns.get(k) for p in prompts] for k in keys}
    table = score(functions, [p.prompt for p in prompts], answers, [ids for ids, _ in generated], columns)
    scored = advantages(table, settings.weights, settings.num_generations, settings.scale_rewards,
                        [f.name for f in functions])  # fmt: skip
    rewards = scored.rewards
    has = ~torch.isnan(rewards)
    sums = [rewards[has].sum(), (rewards[has] ** 2).sum(), has.sum()]
    for k in range(table.shape[1]):
        column = table[:, k]
        kept = ~torch.isnan(column)
        sums += [column[kept].sum(), (column[kept] ** 2).sum(), kept.sum()]
    grouped = rewards.view(-1, settings.num_generations)
    spread = nanstd(grouped, dim=1)  # as TRL counts a group whose rewards are all alike
    alike = torch.isclose(spread, torch.zeros_like(spread))
    lengths = torch.tensor([len(ids) for ids, _ in generated], dtype=torch.float32)
    cut = torch.tensor([c for _, c in generated], dtype=torch.float32)
    sums += [alike.sum(), torch.tensor(float(len(grouped))), lengths.sum(), cut.sum(), torch.tensor(float(len(cut)))]
    names = [f.name for f in functions]
    rows = []
    for i, (prompt, (ids, _)) in enumerate(zip(prompts, generated, strict=True)):
        reward = rewards[i].item()
        row = {"prompt": prompt.prompt, "completion": answers[i], "completion_ids": ids,
               "reward": None if reward != reward else reward}  # fmt: skip
        row |= {f"rewards/{n}": (None if v != v else v) for n, v in zip(names, table[i].tolist(), strict=True)}
        rows.append({**row, "advantage": scored.advantages[i].item()})
    return rows, scored.advantages, torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in sums])


def rollout_row(sums: Sequence[float], names: Sequence[str]) -> dict[str, float]:
    """TRL's metrics of a step's summed rollouts (``rollout_sums`` over every replica)."""

    def mean_std(total: float, squares: float, count: float) -> tuple[float, float]:
        mean = total / count if count else float("nan")
        variance = (squares - count * mean * mean) / (count - 1) if count > 1 else float("nan")
        return mean, max(variance, 0.0) ** 0.5 if count > 1 else float("nan")

    row = {}
    row["reward"], row["reward_std"] = mean_std(*sums[0:3])
    for k, name in enumerate(names):
        row[f"rewards/{name}/mean"], row[f"rewards/{name}/std"] = mean_std(*sums[3 + 3 * k : 6 + 3 * k])
    alike, groups, tokens, cut, count = sums[3 + 3 * len(names) :]
    row["frac_reward_zero_std"] = alike / max(groups, 1.0)
    row["completions/mean_length"] = tokens / max(count, 1.0)
    row["completions/clipped_ratio"] = cut / max(count, 1.0)
    return row
