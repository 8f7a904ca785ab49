"""LLaMA family (Llama 2/3 and look-alikes): HF's ``LlamaDecoderLayer``.

Grouped-query attention and RoPE scaling come with HF's layer and rotary embedding; small
models tie the output layer to the input embedding (see ``Family.tied_keys``).
"""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from modules.common import Embedding, Head, RotaryContext
from modules.family import EMBEDDING_PART, HEAD_PART, Family, KeyRule


def embedding(config: object) -> Embedding:
    return Embedding(config.vocab_size, config.hidden_size, 0.0, "embed_tokens")


def head(config: object) -> Head:
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return Head("norm", norm, "lm_head", nn.Linear(config.hidden_size, config.vocab_size, bias=False))


def context(config: object) -> RotaryContext:
    return RotaryContext(config, LlamaRotaryEmbedding(config=config))


FAMILY = Family(
    name="llama",
    hf_model_types=("llama",),
    embedding=embedding,
    block=LlamaDecoderLayer,
    head=head,
    context=context,
    key_rules=(
        KeyRule(hf="model.embed_tokens.", part=EMBEDDING_PART, local="embed_tokens."),
        KeyRule(hf="model.layers.{layer}.", part="layer_{layer}"),
        KeyRule(hf="model.norm.", part=HEAD_PART, local="norm."),
        KeyRule(hf="lm_head.", part=HEAD_PART, local="lm_head."),
    ),
    tied_keys=("embed_tokens.weight", "lm_head.weight"),
)
