"""GPT-NeoX (Pythia, RedPajama-INCITE) as embedding, blocks and head for one device.

Blocks are Hugging Face's own ``GPTNeoXLayer``, so a chain of our stages computes exactly
what ``GPTNeoXForCausalLM`` computes; parameter names inside each piece match the layer-sharded
files the original system wrote (``embed_in``, ``final_layer_norm``, ``embed_out``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

from modules.family import EMBEDDING_PART, HEAD_PART, Family, KeyRule
from modules.masks import causal_mask


class Embedding(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb_dropout(self.embed_in(input_ids))  # (micro, seq, hidden)


class Head(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(self.final_layer_norm(hidden))  # (micro, seq, vocab)


class Context(nn.Module):
    """Rotary cos/sin and the causal mask, shared by every block of a stage."""

    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.config = config
        self.rotary = GPTNeoXRotaryEmbedding(config=config)

    def forward(self, hidden: torch.Tensor) -> dict[str, object]:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return {
            "attention_mask": causal_mask(self.config, hidden, position_ids),
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids=position_ids),
        }


FAMILY = Family(
    name="gptneox",
    hf_model_types=("gpt_neox",),
    embedding=Embedding,
    block=GPTNeoXLayer,
    head=Head,
    context=Context,
    key_rules=(
        KeyRule(hf="gpt_neox.embed_in.", part=EMBEDDING_PART, local="embed_in."),
        KeyRule(hf="gpt_neox.layers.{layer}.", part="layer_{layer}"),
        KeyRule(hf="gpt_neox.final_layer_norm.", part=HEAD_PART, local="final_layer_norm."),
        KeyRule(hf="lm_head.", part=HEAD_PART, local="embed_out."),
    ),
)
