"""How the last stage picks each next token: greedy at temperature 0, else sampled after
temperature, top-k and top-p, applied in that order as HF's ``generate`` applies its warpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """``--temperature``, ``--top-k``, ``--top-p`` and ``--max-completion-length``."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    max_completion_length: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be 0 (greedy) or positive, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be 0 (off) or positive, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must lie in (0, 1], not {self.top_p}")
        if self.max_completion_length < 1:
            raise ValueError(f"--max-completion-length must be at least 1, not {self.max_completion_length}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """``logits`` (rows, vocab) divided by the temperature, with the tokens top-k and top-p rule
    out set to -inf. Top-p keeps the smallest set of likeliest tokens whose probability reaches
    ``top_p`` (the likeliest one always)."""
    scores = logits.float() / cfg.temperature
    if cfg.top_k:
        k = min(cfg.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1:
        ascending, order = torch.sort(scores, dim=-1)
        below = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - cfg.top_p  # the unlikely tail
        below[..., -1] = False
        scores = scores.masked_fill(below.scatter(-1, order, below), float("-inf"))
    return scores


class Sampler:
    """Picks next tokens from logits, drawing from its own generator (saved for exact resume)."""

    def __init__(self, cfg: SamplingConfig, seed: int, device: torch.device) -> None:
        self.cfg = cfg
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row of ``logits`` (rows, vocab)."""
        if self.cfg.greedy:
            return logits.argmax(dim=-1)
        probs = filtered_logits(logits, self.cfg).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
