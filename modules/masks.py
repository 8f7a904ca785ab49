"""Attention masks for packed sequences, as Hugging Face's models build them.

Position ids that restart (examples packed apart, data.stream) give every example a causal
block of its own; HF's builders find them only where no cache is passed, as in training.

A model's layers attend in one of two ways: full causal attention, or causal attention over a
sliding window of ``config.sliding_window`` tokens. Which layer does which is the model's
``config.layer_types`` where it has one (Gemma 2/3, Qwen), else every layer slides when the
config sets a window (Mistral, Phi-3) and none does otherwise, exactly as HF's models decide.
"""

from __future__ import annotations

import torch

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
KINDS = (FULL_ATTENTION, SLIDING_ATTENTION)


def _builder(kind: str) -> object:
    """HF's mask builder of an attention kind (imported when a mask is built: ``--help`` needs none)."""
    from transformers import masking_utils

    return {FULL_ATTENTION: masking_utils.create_causal_mask,
            SLIDING_ATTENTION: masking_utils.create_sliding_window_causal_mask}[kind]  # fmt: skip


def layer_kinds(config: object) -> list[str]:
    """The attention kind of every global layer."""
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        sliding = getattr(config, "sliding_window", None) is not None
        return [SLIDING_ATTENTION if sliding else FULL_ATTENTION] * config.num_hidden_layers
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(
            f"layer_types {sorted(unknown)} in config.json: only {sorted(KINDS)} are supported; "
            "this model attends in a way the trainer does not reproduce"
        )
    return list(kinds)


def attention_masks(
    config: object,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    kinds: set[str],
    padding: torch.Tensor | None = None,
    cache: object | None = None,
    layer_ids: list[int] | None = None,
) -> dict[str, object]:
    """The mask HF's decoder layers expect for each of ``kinds``; ``position_ids`` (1 or micro,
    seq) that restart keep packed examples apart.

    With SDPA and full attention this is usually ``None`` (the kernel's own causal flag is
    used); with eager attention or a sliding window it is a 4-D mask. Either way it is what the
    HF model itself would pass to a layer of that kind.

    Generating (generation/): ``padding`` (micro, cached + new tokens) is 0 on left padding and
    ``cache`` holds the keys and values seen so far; the mask's sizes are read from the cache of
    this stage's first layer of each kind (``layer_ids``), since HF's default, the model's first
    layer, is on another stage."""
    kinds_by_layer = layer_kinds(config)
    masks = {}
    for kind in kinds:
        layer = None
        if cache is not None:
            layer = next(i for i in (layer_ids or range(len(kinds_by_layer))) if kinds_by_layer[i] == kind)
        masks[kind] = _builder(kind)(config=config, inputs_embeds=hidden, attention_mask=padding, cache=cache,
                                     position_ids=position_ids, layer_idx=layer)  # fmt: skip
    return masks
