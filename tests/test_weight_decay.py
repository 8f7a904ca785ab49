"""Weight decay falls where HF's Trainer (and so TRL) puts it: not on biases, not on norm weights.

The rule (trainer.optimizer.decayed_names) reads a stage's own parameter names; for every family
those name the same weights that HF's ``Trainer.get_decay_parameter_names`` picks on HF's model.
No process starts here: models are built on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from convert.tiny_model import tiny_config
from modules import family_for
from modules.lora import LoraSpec
from objectives.reward import Reward
from pipeline.stage import Stage
from trainer.optimizer import decayed_names

FAMILIES = ["gptneox", "gptj", "gpt2", "llama", "llama_pad", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma",
            "gemma2", "gemma3", "mixtral", "qwen3_moe"]  # fmt: skip


def hf_decayed(model: torch.nn.Module) -> set[str]:
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # it reads the model alone


def whole_stage(config: object, score: bool = False) -> Stage:
    family = family_for(config.model_type)
    options = Reward().stage_options() if score else {}
    return Stage(family, config, range(config.num_hidden_layers), True, True, device="meta", **options)


def hf_names(stage: Stage, names: set[str]) -> set[str]:
    """Our stage's parameter ``names`` as HF's model names them."""
    out = set()
    for part, module in stage.parts().items():
        prefix = next(n for n, m in stage.named_modules() if m is module)
        for local, _ in module.named_parameters(remove_duplicate=False):
            if f"{prefix}.{local}" in names:
                out.add(stage.family.shard_to_hf(part, local))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_decay_falls_on_the_weights_hf_trainer_decays(family: str) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size=64, num_layers=2)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    stage = whole_stage(config)
    ours = decayed_names(stage)
    every = {name for name, _ in stage.named_parameters()}
    # the rule is not trivial on any family: some weights decay, some do not
    assert ours and ours != every
    assert hf_names(stage, ours) == hf_decayed(hf) & hf_names(stage, every)
    # and a norm's weight or a bias never decays
    assert not any("norm" in name or name.endswith("bias") or ".ln_" in name for name in ours), sorted(ours)


def test_under_lora_the_adapters_and_a_reward_head_decay_the_frozen_norms_do_not() -> None:
    """The same rule under LoRA: HF's Trainer over PEFT's model decays every adapter weight (they
    have no bias) and a reward model's score head; the optimizer only sees what trains."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("llama", vocab_size=64, num_layers=2)
    config.num_labels = 1
    stage = whole_stage(config, score=True)
    spec = stage.add_lora(LoraSpec(rank=4, alpha=8.0, dropout=0.0), seed=0)
    trained = {name for name, p in stage.named_parameters() if p.requires_grad}
    ours = decayed_names(stage) & trained
    assert ours == trained and "score.weight" in ours
    assert len([n for n in ours if ".lora_" in n]) == 2 * len(spec.target_modules) * config.num_hidden_layers

    with torch.device("meta"):
        hf = AutoModelForSequenceClassification.from_config(config)
    lora = spec.peft_config(hf)
    lora.modules_to_save = ["score"]  # a new head trained whole, as our reward model's
    peft = get_peft_model(hf, lora)
    hf_trained = {name for name, p in peft.named_parameters() if p.requires_grad}
    assert hf_trained <= hf_decayed(peft) and len(hf_trained) == len(ours)
