"""Reward functions of the GRPO tests, with TRL's signature. ``short`` and ``parity`` read the
completions' tokens only, so TRL's trainer, replaying our completions, scores them as our run did."""

from __future__ import annotations


def short(prompts: list, completions: list, completion_ids: list[list[int]], **columns: list) -> list[float]:
    """Shorter is better."""
    return [-float(len(ids)) for ids in completion_ids]


def parity(prompts: list, completions: list, completion_ids: list[list[int]], **columns: list) -> list[float | None]:
    """The first token's parity, and no reward (None) for lengths divisible by 3."""
    return [None if len(ids) % 3 == 0 else float(ids[0] % 2) for ids in completion_ids]


def capital_in_a_few_words(prompts: list, completions: list, completion_ids: list[list[int]], city: list,
                           **columns: list) -> list[float]:  # fmt: skip
    """1 where the (chat) answer names the record's capital within 16 tokens, else 0."""
    return [float(city_name in answer[-1]["content"] and len(ids) <= 16)
            for answer, city_name, ids in zip(completions, city, completion_ids, strict=True)]  # fmt: skip
