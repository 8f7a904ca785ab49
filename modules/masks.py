"""Attention masks for packed, unpadded sequences, as Hugging Face's models build them."""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask


def causal_mask(config: object, hidden: torch.Tensor, position_ids: torch.Tensor) -> object:
    """The mask HF's decoder layers expect for a full causal sequence without padding.

    With SDPA this is usually ``None`` (the kernel's own causal flag is used); with eager
    attention it is a 4-D additive mask. Either way it is what the HF model itself would pass.
    """
    return create_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
    )
