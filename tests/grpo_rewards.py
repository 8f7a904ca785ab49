"""Reward functions of the GRPO tests, with TRL's signature: they read the completions' tokens only,
so TRL's trainer, replaying our completions, scores them as our run did."""

from __future__ import annotations


def short(prompts: list, completions: list, completion_ids: list[list[int]], **columns: list) -> list[float]:
    """Shorter is better."""
    return [-float(len(ids)) for ids in completion_ids]


def parity(prompts: list, completions: list, completion_ids: list[list[int]], **columns: list) -> list[float | None]:
    """The first token's parity, and no reward (None) for lengths divisible by 3."""
    return [None if len(ids) % 3 == 0 else float(ids[0] % 2) for ids in completion_ids]
