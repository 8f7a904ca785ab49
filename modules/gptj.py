"""GPT-J: blocks are HF's own ``GPTJBlock`` (parallel attention and MLP, partial rotary)."""

from __future__ import annotations

from types import ModuleType

from torch import nn

from modules.common import BlockContext, Embedding, Head
from modules.family import EMBEDDING_PART, HEAD_PART, Family, KeyRule


def _hf() -> ModuleType:
    """HF's modeling module, imported when a model is built (``--help`` and previews need none)."""
    from transformers.models.gptj import modeling_gptj

    return modeling_gptj


def block(config: object, index: int) -> nn.Module:
    return _hf().GPTJBlock(config, index)


def embedding(config: object) -> Embedding:
    return Embedding(config.vocab_size, config.n_embd, config.embd_pdrop, "wte")


def head(config: object) -> Head:
    norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return Head("ln_f", norm, "lm_head", nn.Linear(config.n_embd, config.vocab_size, bias=True))


def context(config: object) -> BlockContext:
    return BlockContext(config, _hf().GPTJRotaryEmbedding(config))


FAMILY = Family(
    name="gptj",
    hf_model_types=("gptj",),
    embedding=embedding,
    block=block,
    head=head,
    context=context,
    key_rules=(
        KeyRule(hf="transformer.wte.", part=EMBEDDING_PART, local="wte."),
        KeyRule(hf="transformer.h.{layer}.", part="layer_{layer}"),
        KeyRule(hf="transformer.ln_f.", part=HEAD_PART, local="ln_f."),
        KeyRule(hf="lm_head.", part=HEAD_PART, local="lm_head."),
    ),
    tied_keys=("wte.weight", "lm_head.weight"),
)
