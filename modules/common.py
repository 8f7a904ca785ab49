"""Pieces shared by the families: embedding, head and the per-stage block context.

Parameter names are the family's own (``embed_in``, ``wte``, ``embed_tokens``, ...), so shard
files keep the names the original layer-sharded checkpoints used and the key maps stay short.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from modules.masks import attention_masks, layer_kinds


class Embedding(nn.Module):
    """Token embedding, learned positions where the family has them (GPT-2), then dropout.

    ``padding_idx``: the row HF's lookup never gives a gradient (LLaMA-style models pass
    ``config.pad_token_id``; with tied weights the head still trains it). ``scale``: Gemma's
    sqrt(hidden) factor, applied as HF's scaled embedding does (an fp32 scalar cast to the
    weight's dtype, so under bf16 weights the factor is bf16-rounded as in HF)."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        dropout: float,
        token_name: str,
        position_name: str | None = None,
        max_positions: int = 0,
        padding_idx: int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.token_name = token_name
        self.position_name = position_name
        self.scale = scale
        self.add_module(token_name, nn.Embedding(vocab_size, dim, padding_idx=padding_idx))
        if position_name is not None:
            self.add_module(position_name, nn.Embedding(max_positions, dim))
        self.dropout = nn.Dropout(dropout)

    @property
    def token_embedding(self) -> nn.Embedding:
        return getattr(self, self.token_name)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` (micro, seq): where packed examples restart their positions (None: 0..seq-1)."""
        hidden = self.token_embedding(input_ids)  # (micro, seq, hidden)
        if self.scale is not None:
            hidden = hidden * torch.tensor(self.scale).to(hidden.dtype)
        if self.position_name is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            hidden = hidden + getattr(self, self.position_name)(position_ids)
        return self.dropout(hidden)


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (Gemma 2's final logits), in HF's order of operations."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


class Head(nn.Module):
    """Final norm, then the output projection to the vocabulary (soft-capped where the model
    caps its final logits: ``config.final_logit_softcapping``)."""

    def __init__(
        self, norm_name: str, norm: nn.Module, out_name: str, out: nn.Linear, softcap: float | None = None
    ) -> None:
        super().__init__()
        self.norm_name, self.out_name = norm_name, out_name
        self.softcap = softcap
        self.add_module(norm_name, norm)
        self.add_module(out_name, out)

    @property
    def output(self) -> nn.Linear:
        return getattr(self, self.out_name)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.norm_name)(hidden)  # (micro, seq, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(self.normed(hidden))  # (micro, seq, vocab)

    def project(self, normed: torch.Tensor) -> torch.Tensor:
        """The logits of the final norm's output (``normed``): the output layer, soft-capped."""
        return soft_cap(self.output(normed), self.softcap)


class BlockInputs:
    """What the blocks of a stage take besides the hidden states, for one micro-batch:
    ``inputs(i)`` gives global layer ``i``'s keyword arguments (its attention kind's mask and,
    where the model keeps one rotary table per kind, that kind's cos/sin)."""

    def __init__(self, kinds: list[str], shared: dict[str, object], by_kind: dict[str, dict[str, object]]) -> None:
        self.kinds, self.shared, self.by_kind = kinds, shared, by_kind

    def __call__(self, layer: int) -> dict[str, object]:
        return {**self.shared, **self.by_kind[self.kinds[layer]]}


class BlockContext(nn.Module):
    """Position ids, the causal masks and the rotary cos/sin, computed once per micro-batch on
    each stage and handed to every block, as HF's model computes them once for all its layers.
    Position ids that restart (examples packed apart, data.stream) make HF's mask builders give
    each example a causal block of its own, for every attention implementation.

    ``rotary`` None: learned positions (GPT-2), whose blocks take the mask only."""

    def __init__(self, config: object, rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.rotary = rotary
        self.kinds = layer_kinds(config)
        # Gemma 3 keeps one rotary table per attention kind (other base frequency for local layers)
        self.rotary_per_kind = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        cache: object | None = None,
        layer_ids: list[int] | None = None,
    ) -> BlockInputs:
        """Generating: ``cache`` holds the keys and values seen so far (of this stage's
        ``layer_ids``), ``padding`` (micro, cached + new) is 0 where a prompt was left-padded."""
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, seq)
        kinds = set(self.kinds) if cache is None else {self.kinds[i] for i in layer_ids}
        masks = attention_masks(self.config, hidden, position_ids, kinds, padding, cache, layer_ids)
        by_kind = {kind: {"attention_mask": masks[kind]} for kind in kinds}
        if self.rotary is None:
            return BlockInputs(self.kinds, {}, by_kind)
        if self.rotary_per_kind:
            for kind in kinds:
                by_kind[kind]["position_embeddings"] = self.rotary(hidden, position_ids, kind)
            return BlockInputs(self.kinds, {"position_ids": position_ids}, by_kind)
        shared = {"position_ids": position_ids, "position_embeddings": self.rotary(hidden, position_ids=position_ids)}
        return BlockInputs(self.kinds, shared, by_kind)
