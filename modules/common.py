"""Pieces shared by the families: embedding, head and the per-stage block context.

Parameter names are the family's own (``embed_in``, ``wte``, ``embed_tokens``, ...), so shard
files keep the names the original layer-sharded checkpoints used and the key maps stay short.
"""

from __future__ import annotations

import torch
from torch import nn

from modules.masks import causal_mask


class Embedding(nn.Module):
    """Token embedding, learned positions where the family has them (GPT-2), then dropout."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        dropout: float,
        token_name: str,
        position_name: str | None = None,
        max_positions: int = 0,
    ) -> None:
        super().__init__()
        self.token_name = token_name
        self.position_name = position_name
        self.add_module(token_name, nn.Embedding(vocab_size, dim))
        if position_name is not None:
            self.add_module(position_name, nn.Embedding(max_positions, dim))
        self.dropout = nn.Dropout(dropout)

    @property
    def token_embedding(self) -> nn.Embedding:
        return getattr(self, self.token_name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embedding(input_ids)  # (micro, seq, hidden)
        if self.position_name is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            hidden = hidden + getattr(self, self.position_name)(positions)
        return self.dropout(hidden)


class Head(nn.Module):
    """Final norm, then the output projection to the vocabulary."""

    def __init__(self, norm_name: str, norm: nn.Module, out_name: str, out: nn.Linear) -> None:
        super().__init__()
        self.norm_name, self.out_name = norm_name, out_name
        self.add_module(norm_name, norm)
        self.add_module(out_name, out)

    @property
    def output(self) -> nn.Linear:
        return getattr(self, self.out_name)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.norm_name)(hidden)  # (micro, seq, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.normed(hidden))  # (micro, seq, vocab)


class RotaryContext(nn.Module):
    """Rotary cos/sin and the causal mask, computed once per micro-batch for all blocks."""

    def __init__(self, config: object, rotary: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor) -> dict[str, object]:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, seq)
        return {
            "attention_mask": causal_mask(self.config, hidden, position_ids),
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids=position_ids),
        }


class MaskContext(nn.Module):
    """Only the causal mask, for families with learned positions (GPT-2)."""

    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden: torch.Tensor) -> dict[str, object]:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return {"attention_mask": causal_mask(self.config, hidden, position_ids)}
