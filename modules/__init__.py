"""Single-device model pieces per family, and the registry that picks a family."""

from __future__ import annotations

import json
from pathlib import Path

from modules.family import EMBEDDING_PART, HEAD_PART, Family, KeyRule, init_weights, layer_part, part_generator
from modules.gpt2 import FAMILY as GPT2
from modules.gptj import FAMILY as GPTJ
from modules.gptneox import FAMILY as GPTNEOX
from modules.llama import FAMILY as LLAMA

FAMILIES: dict[str, Family] = {family.name: family for family in (GPTNEOX, GPTJ, LLAMA, GPT2)}

__all__ = [
    "EMBEDDING_PART",
    "FAMILIES",
    "HEAD_PART",
    "Family",
    "KeyRule",
    "family_for",
    "init_weights",
    "layer_part",
    "load_config",
    "part_generator",
]


def family_for(model_type: str) -> Family:
    """Family by our name (``gptneox``) or by HF's ``model_type`` (``gpt_neox``)."""
    for family in FAMILIES.values():
        if model_type == family.name or model_type in family.hf_model_types:
            return family
    known = ", ".join(sorted(FAMILIES))
    raise ValueError(f"unknown model type {model_type!r}; use --model-type with one of: {known}")


def load_config(model_dir: str | Path, attn_implementation: str = "sdpa") -> object:
    """Read ``config.json`` of an HF or layer-sharded model directory into an HF config object."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}; pass a model converted with convert/from_hf.py")
    with open(path) as f:
        model_type = json.load(f).get("model_type", "")
    family_for(model_type)  # fail early and clearly on a family we do not support
    config = AutoConfig.from_pretrained(str(model_dir))
    # One attention kernel everywhere, so stages and the HF reference compute the same thing.
    config._attn_implementation = attn_implementation
    return config
