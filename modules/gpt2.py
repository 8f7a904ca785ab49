"""GPT-2: HF's ``GPT2Block``; learned positions live in the embedding part (``wpe``)."""

from __future__ import annotations

from torch import nn

from modules.common import BlockContext, Embedding, Head
from modules.family import EMBEDDING_PART, HEAD_PART, Family, KeyRule


def block(config: object, index: int) -> nn.Module:
    """HF's GPT2Block, imported when a model is built (``--help`` and previews need none)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return GPT2Block(config, index)


def embedding(config: object) -> Embedding:
    return Embedding(config.vocab_size, config.n_embd, config.embd_pdrop, "wte", "wpe", config.n_positions)


def head(config: object) -> Head:
    norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return Head("ln_f", norm, "lm_head", nn.Linear(config.n_embd, config.vocab_size, bias=False))


FAMILY = Family(
    name="gpt2",
    hf_model_types=("gpt2",),
    embedding=embedding,
    block=block,
    head=head,
    context=BlockContext,
    key_rules=(
        KeyRule(hf="transformer.wte.", part=EMBEDDING_PART, local="wte."),
        KeyRule(hf="transformer.wpe.", part=EMBEDDING_PART, local="wpe."),
        KeyRule(hf="transformer.h.{layer}.", part="layer_{layer}"),
        KeyRule(hf="transformer.ln_f.", part=HEAD_PART, local="ln_f."),
        KeyRule(hf="lm_head.", part=HEAD_PART, local="lm_head."),
    ),
    tied_keys=("wte.weight", "lm_head.weight"),
    # the original GPT-2 files name the transformer's weights without their module's prefix
    legacy_rules=(
        KeyRule(hf="wte.", part=EMBEDDING_PART, local="wte."),
        KeyRule(hf="wpe.", part=EMBEDDING_PART, local="wpe."),
        KeyRule(hf="h.{layer}.", part="layer_{layer}"),
        KeyRule(hf="ln_f.", part=HEAD_PART, local="ln_f."),
    ),
    learned_positions=True,
)
