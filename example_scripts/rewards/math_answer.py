"""Reward functions for math word problems whose records carry the right ``answer`` (GSM8K-style),
with TRL's signature, for ``--objective grpo --reward-funcs example_scripts/rewards/math_answer.py:correct_answer``.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(completion: str | list[dict]) -> str:
    """A completion as text: a string, or the assistant's message of a conversational prompt."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def last_number(text: str) -> str | None:
    """The last number written in ``text``, without thousands separators ("1,234.50" -> "1234.50")."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def correct_answer(prompts: list, completions: list, completion_ids: list, answer: list, **columns: list) -> list:
    """1 where the completion's last number is the record's answer, else 0 (None: no answer given)."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            rewards.append(None)
            continue
        said = last_number(_text(completion))
        rewards.append(1.0 if said is not None and float(said) == float(str(expected).replace(",", "")) else 0.0)
    return rewards


def answers_briefly(prompts: list, completions: list, completion_ids: list, **columns: list) -> list:
    """A small bonus for answers of at most 200 characters: the model learns to stop."""
    return [0.2 if len(_text(c)) <= 200 else 0.0 for c in completions]
