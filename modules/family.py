"""The interface every model family implements, and the key map between HF and shard names.

A family turns one HF config into three single-device pieces:

    input_ids (micro, seq) -> Embedding -> hidden (micro, seq, dim)
    hidden -> Block(layer i) -> hidden            (one per global layer index)
    hidden -> Head -> logits (micro, seq, vocab)

plus a ``Context`` module without parameters that prepares what every block of a stage needs
(rotary cos/sin, the causal mask), computed once per micro-batch on each stage.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modules.experts import ExpertLayout

EMBEDDING_PART = "embs"
HEAD_PART = "lm_head"
# a reward model's scalar head (hidden -> 1, no bias: HF's ForSequenceClassification ``score``), on the last stage
SCORE_PART = "score"


def layer_part(index: int) -> str:
    """Name of the shard that holds global layer ``index``."""
    return f"layer_{index}"


def part_generator(seed: int, part: str) -> torch.Generator:
    """The random stream a part is initialised from: the seed and the part's name, nothing else."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(part.encode()))


def init_weights(module: nn.Module, std: float, seed: int, part: str, norm_init: float = 1.0) -> None:
    """Fresh weights as HF's causal LMs initialise them, from ``seed`` and the part's name only,
    so a model trained from scratch starts the same under every topology: normal weights, zero
    biases and padding row, norms at ``norm_init`` (0 where a norm stores its offset from 1)."""
    generator = part_generator(seed, part)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)) or type(sub).__name__ == "Conv1D":
            with torch.no_grad():
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * std)
                if getattr(sub, "padding_idx", None) is not None:
                    sub.weight[sub.padding_idx].zero_()
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm) or type(sub).__name__.endswith("RMSNorm"):
            nn.init.constant_(sub.weight, 1.0 if isinstance(sub, nn.LayerNorm) else norm_init)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)


@dataclass(frozen=True)
class KeyRule:
    """One HF key prefix <-> (shard part, key prefix inside the part).

    ``{layer}`` in ``hf`` and ``part`` stands for the global layer index; the inverse mapping
    is derived from the same rule, so the two directions can never disagree.
    """

    hf: str
    part: str
    local: str = ""

    def _hf_pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.hf).replace(r"\{layer\}", r"(?P<layer>\d+)"))

    def to_shard(self, hf_key: str) -> tuple[str, str] | None:
        match = self._hf_pattern().match(hf_key)
        if match is None:
            return None
        layer = match.groupdict().get("layer")
        part = self.part.format(layer=layer) if layer is not None else self.part
        return part, self.local + hf_key[match.end() :]

    def to_hf(self, part: str, local_key: str) -> str | None:
        part_pattern = re.escape(self.part).replace(r"\{layer\}", r"(?P<layer>\d+)")
        match = re.fullmatch(part_pattern, part)
        if match is None or not local_key.startswith(self.local):
            return None
        layer = match.groupdict().get("layer")
        prefix = self.hf.format(layer=layer) if layer is not None else self.hf
        return prefix + local_key[len(self.local) :]


@dataclass(frozen=True)
class Family:
    """Everything the pipeline and the converters need to know about one model family."""

    name: str
    hf_model_types: tuple[str, ...]
    embedding: Callable[[object], nn.Module]
    block: Callable[[object, int], nn.Module]
    head: Callable[[object], nn.Module]
    context: Callable[[object], nn.Module]
    key_rules: tuple[KeyRule, ...]
    # (key in the embedding part, key in the head part) of the weights HF ties when
    # ``config.tie_word_embeddings`` is set.
    tied_keys: tuple[str, str]
    # Learned position embeddings end at config.max_position_embeddings (rotary ones do not).
    learned_positions: bool = False
    # What a fresh RMSNorm weight holds: 1, or 0 where the norm multiplies by (1 + weight) (Gemma).
    norm_init: float = 1.0
    # Mixture-of-experts layers: per-expert tensors on disk, fused in memory (modules/experts.py).
    experts: ExpertLayout | None = None
    # Its routers: HF's router class and where its output holds the logits (modules/routing.py).
    router: Callable[[], tuple[type, int]] | None = None
    # The keyword HF's block takes its key/value cache by (generation/): ``layer_past`` in GPT-NeoX.
    cache_arg: str = "cache"
    # Names HF's files use where they differ from the in-memory ones: read and written.
    disk_rules: tuple[KeyRule, ...] = ()
    # Names of older files, still read, never written.
    legacy_rules: tuple[KeyRule, ...] = ()

    def _regrouped(self, part: str) -> ExpertLayout | None:
        return self.experts if part.startswith("layer_") else None

    def memory_keys(self, part: str, disk_keys: set[str]) -> set[str]:
        """The keys a part read from HF's files under ``disk_keys`` (local names) holds in memory."""
        layout = self._regrouped(part)
        return layout.memory_keys(disk_keys) if layout else disk_keys

    def to_memory(self, part: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A part's tensors as read from HF's files, laid out as the model holds them."""
        layout = self._regrouped(part)
        return layout.to_memory(tensors) if layout else tensors

    def to_disk(self, part: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A part's tensors laid out as HF's files hold them."""
        layout = self._regrouped(part)
        return layout.to_disk(tensors) if layout else tensors

    def disk_shapes(self, part: str, shapes: dict) -> dict:
        """``to_disk``'s names, shapes and dtypes for tensors of ``shapes``."""
        layout = self._regrouped(part)
        return layout.disk_shapes(shapes) if layout else shapes

    def hf_to_shard(self, hf_key: str, on_disk: bool = False) -> tuple[str, str]:
        """Part and key inside it of an HF weight; ``on_disk``: a name read from an HF file."""
        rules = self.key_rules + (self.disk_rules + self.legacy_rules if on_disk else ())
        for rule in rules:
            found = rule.to_shard(hf_key)
            if found is not None:
                return found
        raise KeyError(f"{self.name}: no shard for HF weight {hf_key!r}; is config.json this model's?")

    def shard_to_hf(self, part: str, local_key: str, on_disk: bool = False) -> str:
        """The HF name of a shard weight: in memory, or ``on_disk`` as HF's files spell it."""
        # Longest local prefix first, so "final_layer_norm." wins over "" within one part.
        rules = (self.disk_rules if on_disk else ()) + self.key_rules
        for rule in sorted(rules, key=lambda r: len(r.local), reverse=True):
            found = rule.to_hf(part, local_key)
            if found is not None:
                return found
        raise KeyError(f"{self.name}: shard {part!r} holds unknown weight {local_key!r}")
