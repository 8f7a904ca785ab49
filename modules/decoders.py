"""The LLaMA-layout families: one table row each, built from HF's own modules.

Every model here is laid out as HF's ``LlamaForCausalLM`` is (``model.embed_tokens``,
``model.layers.<i>``, ``model.norm``, ``lm_head``) and runs HF's own decoder layer, RMSNorm and
rotary embedding classes, found by the family's class prefix in its ``modeling_<type>`` module
(``Qwen2DecoderLayer``, ``Qwen2RMSNorm``, ``Qwen2RotaryEmbedding``). What those models do outside
their layers is reproduced around them, read from the config as HF's ``forward`` reads it:

- the embedding's padding row (``pad_token_id``) gets no gradient from the lookup;
- Gemma scales the embedding by sqrt(hidden) and stores its norms as offsets from 1
  (so fresh norms start at 0);
- ``final_logit_softcapping`` caps the logits (Gemma 2); attention soft-capping runs under eager
  attention (``modules.attention_implementation``);
- sliding-window and full layers get their own masks, and Gemma 3 its own rotary table per kind
  (``modules.common.BlockContext``).

Adding a family of this layout is one row in ``DECODERS`` and its case in tests/test_families.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from modules.common import BlockContext, Embedding, Head
from modules.experts import MIXTRAL, QWEN_MOE, ExpertLayout
from modules.family import EMBEDDING_PART, HEAD_PART, Family, KeyRule

LLAMA_LAYOUT = (
    KeyRule(hf="model.embed_tokens.", part=EMBEDDING_PART, local="embed_tokens."),
    KeyRule(hf="model.layers.{layer}.", part="layer_{layer}"),
    KeyRule(hf="model.norm.", part=HEAD_PART, local="norm."),
    KeyRule(hf="lm_head.", part=HEAD_PART, local="lm_head."),
)


@dataclass(frozen=True)
class Decoder:
    """One family of the LLaMA layout: its name, HF's model types, where HF's classes are."""

    name: str
    model_types: tuple[str, ...]
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class prefix inside it: <prefix>DecoderLayer, <prefix>RMSNorm, <prefix>RotaryEmbedding
    gemma: bool = False  # embedding scaled by sqrt(hidden); norms store (weight - 1)
    experts: ExpertLayout | None = None  # mixture of experts: HF's files keep one tensor per expert

    def hf_class(self, suffix: str) -> type:
        modeling = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(modeling, self.prefix + suffix)

    def router(self) -> tuple[type, int]:
        """The router class and the index of its logits, as HF's model records them."""
        recorder = self.hf_class("PreTrainedModel")._can_record_outputs["router_logits"]
        return recorder.target_class, recorder.index

    def embedding(self, config: object) -> Embedding:
        scale = config.hidden_size**0.5 if self.gemma else None
        return Embedding(
            config.vocab_size, config.hidden_size, 0.0, "embed_tokens", padding_idx=config.pad_token_id, scale=scale
        )

    def block(self, config: object, index: int) -> nn.Module:
        return self.hf_class("DecoderLayer")(config, index)

    def head(self, config: object) -> Head:
        norm = self.hf_class("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        return Head("norm", norm, "lm_head", out, softcap=getattr(config, "final_logit_softcapping", None))

    def context(self, config: object) -> BlockContext:
        return BlockContext(config, self.hf_class("RotaryEmbedding")(config=config))

    def family(self) -> Family:
        return Family(
            name=self.name,
            hf_model_types=self.model_types,
            embedding=self.embedding,
            block=self.block,
            head=self.head,
            context=self.context,
            key_rules=LLAMA_LAYOUT,
            tied_keys=("embed_tokens.weight", "lm_head.weight"),
            norm_init=0.0 if self.gemma else 1.0,
            experts=self.experts,
            router=self.router if self.experts is not None else None,
        )


DECODERS = (
    Decoder("llama", ("llama",), "llama", "Llama"),  # Llama 2/3: GQA, rope scaling
    Decoder("mistral", ("mistral",), "mistral", "Mistral"),  # sliding window on every layer
    Decoder("qwen2", ("qwen2",), "qwen2", "Qwen2"),  # q/k/v biases; sliding layers by layer_types
    Decoder("qwen3", ("qwen3",), "qwen3", "Qwen3"),  # per-head q/k RMSNorm
    Decoder("phi3", ("phi3",), "phi3", "Phi3"),  # fused qkv and gate_up; longrope
    Decoder("olmo2", ("olmo2",), "olmo2", "Olmo2"),  # norms after attention and MLP; q/k norm
    Decoder("gemma", ("gemma",), "gemma", "Gemma", gemma=True),
    Decoder("gemma2", ("gemma2",), "gemma2", "Gemma2", gemma=True),  # soft-capping, alternating windows
    Decoder("gemma3", ("gemma3_text",), "gemma3", "Gemma3", gemma=True),  # rotary table per layer kind
    # all experts of a layer on its stage; the routers' load-balancing loss as the config (or
    # --moe-aux-loss-coef) says, computed across the stages (modules/routing.py)
    Decoder("mixtral", ("mixtral",), "mixtral", "Mixtral", experts=MIXTRAL),
    Decoder("qwen3_moe", ("qwen3_moe",), "qwen3_moe", "Qwen3Moe", experts=QWEN_MOE),
)
FAMILIES = tuple(decoder.family() for decoder in DECODERS)
