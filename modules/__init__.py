"""Single-device model pieces per family, and the registry that picks a family."""

from __future__ import annotations

import json
from pathlib import Path

from modules.decoders import FAMILIES as DECODER_FAMILIES
from modules.family import (
    EMBEDDING_PART,
    HEAD_PART,
    SCORE_PART,
    Family,
    KeyRule,
    init_weights,
    layer_part,
    part_generator,
)
from modules.gpt2 import FAMILY as GPT2
from modules.gptj import FAMILY as GPTJ
from modules.gptneox import FAMILY as GPTNEOX

FAMILIES: dict[str, Family] = {family.name: family for family in (GPTNEOX, GPTJ, GPT2, *DECODER_FAMILIES)}

__all__ = [
    "EMBEDDING_PART",
    "FAMILIES",
    "HEAD_PART",
    "SCORE_PART",
    "Family",
    "KeyRule",
    "attention_implementation",
    "describe_model",
    "family_for",
    "family_of",
    "init_weights",
    "is_classifier",
    "layer_part",
    "load_config",
    "part_generator",
    "read_config",
]


def supported_model_types() -> list[str]:
    return sorted({t for family in FAMILIES.values() for t in family.hf_model_types})


def family_for(model_type: str) -> Family:
    """Family by our name (``gptneox``) or by HF's ``model_type`` (``gpt_neox``)."""
    for family in FAMILIES.values():
        if model_type == family.name or model_type in family.hf_model_types:
            return family
    raise ValueError(
        f"unsupported model type {model_type!r}: this trainer computes {', '.join(supported_model_types())}; "
        "a model of another type cannot be converted or trained here"
    )


def _model_types_of_class(class_name: str) -> set[str]:
    """The model types whose HF classes (of any head) are named ``class_name``."""
    from transformers.models.auto import modeling_auto

    found = set()
    for name, mapping in vars(modeling_auto).items():
        if name.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            found |= {model_type for model_type, cls in mapping.items() if cls == class_name}
    return found


def family_of(config: object, requested: str | None = None) -> Family:
    """The family of an HF config, checked: a config whose ``architectures`` belong to another
    model type than its ``model_type`` (a relabelled config) is refused, naming both, since the
    model would be computed as the wrong family; so is a ``requested`` family (``--model-type``)
    that is not the config's."""
    model_type = config.model_type
    family = family_for(model_type)
    for architecture in getattr(config, "architectures", None) or []:
        owners = _model_types_of_class(architecture)
        if owners and model_type not in owners:
            raise ValueError(
                f"config.json says model_type {model_type!r} but its architectures name {architecture} "
                f"(model type {' or '.join(sorted(owners))}): a relabelled config would be computed as the wrong "
                f"model; restore its model_type (supported: {', '.join(supported_model_types())})"
            )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"{model_type}: config.json sets use_bidirectional_attention (an embedding model, not a causal LM); "
            "this trainer fine-tunes causal language models only"
        )
    if requested is not None and family_for(requested) is not family:
        raise ValueError(
            f"--model-type {requested} contradicts config.json's model_type {model_type!r} ({family.name}); "
            "drop --model-type: the family is read from config.json"
        )
    return family


def is_classifier(config: object) -> bool:
    """Whether an HF config is a sequence classifier's (a reward model), by its architectures."""
    return any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or [])


def attention_implementation(config: object) -> str:
    """The attention kernel HF's own model runs for ``config``: SDPA, except eager where the
    model cannot run SDPA (Gemma 2's class says so) or soft-caps its attention logits (SDPA has
    no soft-capping). Stages and the single-process reference use the same one."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "eager"
    return "sdpa" if getattr(_causal_lm_class(config), "_supports_sdpa", True) else "eager"


def experts_implementation(config: object) -> str | None:
    """The fused experts' kernel HF's own model runs: ``grouped_mm`` where its class can switch
    kernels (one batched matmul over all experts, not a loop over them), None for models without."""
    model_class = _causal_lm_class(config)
    if model_class is None or not model_class._can_set_experts_implementation():
        return None
    return "grouped_mm"


def _causal_lm_class(config: object) -> type | None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""), None)


def describe_model(config: object) -> str:
    """One line saying what the stages compute for ``config``: the family and the quirks of it
    that are on, as the start-up log states them."""
    import torch

    from modules.masks import SLIDING_ATTENTION, layer_kinds

    family = family_for(config.model_type)
    with torch.device("meta"):
        embedding = family.embedding(config)
    said = [f"{family.name}, {config.num_hidden_layers} layers of hidden {config.hidden_size}",
            f"{getattr(config, '_attn_implementation', None) or 'sdpa'} attention"]  # fmt: skip
    if getattr(config, "tie_word_embeddings", False):
        said.append("tied embeddings")
    pad = embedding.token_embedding.padding_idx
    if pad is not None:
        how = "through the tied head only" if getattr(config, "tie_word_embeddings", False) else "never"
        said.append(f"padding row {pad} trained {how}")
    if getattr(embedding, "scale", None):
        said.append(f"embedding scaled by {embedding.scale:.4g}")
    sliding = [i for i, kind in enumerate(layer_kinds(config)) if kind == SLIDING_ATTENTION]
    if sliding:
        said.append(f"sliding window {config.sliding_window} on {len(sliding)} of {config.num_hidden_layers} layers")
    for name, what in (("attn_logit_softcapping", "attention"), ("final_logit_softcapping", "final logits")):
        if getattr(config, name, None) is not None:
            said.append(f"{what} soft-capped at {getattr(config, name)}")
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if family.experts is not None and experts:
        loss = (
            f"router load-balancing loss x {config.router_aux_loss_coef:g}"
            if getattr(config, "output_router_logits", False)
            else "no router loss (output_router_logits off)"
        )
        said.append(f"{experts} experts, top-{config.num_experts_per_tok}, {loss}")
    return "; ".join(said)


def read_config(source: str | Path, requested: str | None = None) -> tuple[object, Family]:
    """The HF config of a model folder or hub id and its family, checked by ``family_of``; a
    folder's ``model_type`` is checked first, before AutoConfig reads (or rejects) a type we do
    not compute."""
    from transformers import AutoConfig

    path = Path(source) / "config.json"
    if path.is_file():
        with open(path) as f:
            raw = json.load(f)
        if "model_type" not in raw:
            raise ValueError(f"{path} names no model_type; supported: {', '.join(supported_model_types())}")
        family_for(raw["model_type"])
    config = AutoConfig.from_pretrained(str(source))
    return config, family_of(config, requested)


def load_config(model_dir: str | Path, requested: str | None = None) -> object:
    """Read ``config.json`` of an HF or layer-sharded model directory into an HF config object,
    checked by ``family_of`` before anything else reads it."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}; pass a model converted with convert/from_hf.py")
    config, _ = read_config(model_dir, requested)
    # One attention kernel everywhere, so stages and the HF reference compute the same thing.
    config._attn_implementation = attention_implementation(config)
    config._experts_implementation = experts_implementation(config)
    return config
