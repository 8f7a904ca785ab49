"""GPT-NeoX (Pythia, RedPajama-INCITE): blocks are HF's own ``GPTNeoXLayer``.

Names inside the shards follow the original layer-sharded files: ``embed_in``,
``final_layer_norm``, ``embed_out`` (HF keeps the output layer as ``lm_head`` in memory).
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from modules.common import BlockContext, Embedding, Head
from modules.family import EMBEDDING_PART, HEAD_PART, Family, KeyRule


def _hf() -> ModuleType:
    """HF's modeling module, imported when a model is built (``--help`` and previews need none)."""
    from transformers.models.gpt_neox import modeling_gpt_neox

    return modeling_gpt_neox


def block(config: object, index: int) -> nn.Module:
    return _hf().GPTNeoXLayer(config, index)


def embedding(config: object) -> Embedding:
    return Embedding(config.vocab_size, config.hidden_size, config.hidden_dropout, "embed_in")


def head(config: object) -> Head:
    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return Head("final_layer_norm", norm, "embed_out", nn.Linear(config.hidden_size, config.vocab_size, bias=False))


def context(config: object) -> BlockContext:
    return BlockContext(config, _hf().GPTNeoXRotaryEmbedding(config=config))


FAMILY = Family(
    name="gptneox",
    hf_model_types=("gpt_neox",),
    embedding=embedding,
    block=block,
    head=head,
    context=context,
    key_rules=(
        KeyRule(hf="gpt_neox.embed_in.", part=EMBEDDING_PART, local="embed_in."),
        KeyRule(hf="gpt_neox.layers.{layer}.", part="layer_{layer}"),
        KeyRule(hf="gpt_neox.final_layer_norm.", part=HEAD_PART, local="final_layer_norm."),
        KeyRule(hf="lm_head.", part=HEAD_PART, local="embed_out."),
    ),
    tied_keys=("embed_in.weight", "embed_out.weight"),
    cache_arg="layer_past",
    disk_rules=(KeyRule(hf="embed_out.", part=HEAD_PART, local="embed_out."),),  # HF's files keep the old name
)
