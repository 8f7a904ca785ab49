"""LoRA adapters on the blocks of a model, through ``peft``.

Adapters go into every block (the decoder layers; not the embedding or head), on the linear
layers named by ``LoraSpec.target_modules`` (default: all of a block's linear layers, which is
what matches full fine-tuning best). Each block's adapters start from a random stream of
(seed, layer) alone, so a pipeline of any shape starts from the same adapters, and a
single-process PEFT model can be given them too (``init_adapters`` on its layers).

Adapter weights are named as PEFT saves them, relative to the block
(``attention.query_key_value.lora_A.weight``), and stored per layer as ``lora_layer_<i>``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from modules.family import Family, layer_part, part_generator

ADAPTER_CONFIG = "lora.json"  # in a LoRA checkpoint: the spec and the base model it adapts


def adapter_part(part: str) -> str:
    """Shard name of the adapters of ``part`` (a ``layer_<i>``)."""
    return f"lora_{part}"


def linear_names(block: nn.Module) -> list[str]:
    """Names (last component) of the linear layers in a block: what LoRA can target."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in block.named_modules()
        if name and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
    }
    return sorted(names)


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty (or "all-linear"): every linear layer of a block

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, not {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, not {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must lie in [0, 1), not {self.dropout}")

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--lora-rank", type=int, default=0, help="rank of the adapters (0: full fine-tuning)")
        group.add_argument(
            "--lora-alpha", type=float, default=None, help="adapter scale alpha/rank (default: 2 x rank)"
        )
        group.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
        group.add_argument(
            "--lora-target-modules",
            nargs="+",
            default=None,
            help="linear layers of each block to adapt, by name, e.g. q_proj v_proj (comma-separated works too; "
            "default, or all-linear: every linear layer of a block)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoraSpec | None:
        """The adapters the flags ask for; None for full fine-tuning (--lora-rank 0)."""
        if args.lora_rank == 0:
            given = [flag for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-target-modules",
                     args.lora_target_modules)) if value is not None]  # fmt: skip
            if given:
                raise ValueError(f"{' and '.join(given)} need --lora-rank R (> 0) to turn LoRA on")
            return None
        items = args.lora_target_modules or ()
        items = [items] if isinstance(items, str) else items  # a --config file may give one string
        targets = tuple(name for item in items for name in str(item).split(",") if name)
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        return cls(args.lora_rank, alpha, args.lora_dropout, targets)

    def resolved(self, block: nn.Module, family: Family) -> LoraSpec:
        """This spec with its targets checked against (and defaulted from) a real block."""
        available = linear_names(block)
        everything = not self.target_modules or self.target_modules == ("all-linear",)  # PEFT's spelling
        targets = tuple(available) if everything else self.target_modules
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise ValueError(
                f"--lora-target-modules {' '.join(unknown)}: no such linear layer in a {family.name} block; "
                f"choose from {' '.join(available)}"
            )
        # sorted: the same layers named in another order are the same adapters (and resume)
        return LoraSpec(self.rank, self.alpha, self.dropout, tuple(sorted(set(targets))))

    def peft_config(self, model: nn.Module) -> object:
        """PEFT's config of these adapters for ``model`` (a block or a whole HF model)."""
        from peft import LoraConfig

        # GPT-2's Conv1D keeps its weight transposed; PEFT must be told so.
        conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            fan_in_fan_out=conv1d,
            bias="none",
        )

    def to_json(self, base_model: str) -> str:
        return json.dumps({**asdict(self), "base_model": base_model}, indent=1)

    @staticmethod
    def read(directory: str | Path) -> tuple[LoraSpec, str] | None:
        """The spec and base model recorded in a LoRA checkpoint; None for a full-weight one."""
        path = Path(directory) / ADAPTER_CONFIG
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
            base = saved.pop("base_model")
            saved["target_modules"] = tuple(saved["target_modules"])
            return LoraSpec(**saved), base
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); restore it from a copy") from None


def add_adapters(block: nn.Module, spec: LoraSpec, seed: int, part: str) -> None:
    """Wrap the targeted layers of ``block`` with LoRA (in place) and initialise the adapters.
    ``spec`` must be resolved; the block's own weights must already be loaded (PEFT renames
    them to ``<layer>.base_layer.weight``)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(spec.peft_config(block), block)
    init_adapters(block, seed, part)


def _lora_layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in block.named_modules() if isinstance(m, LoraLayer)]


def init_adapters(block: nn.Module, seed: int, part: str) -> None:
    """PEFT's default start (A uniform in +-1/sqrt(fan_in), as kaiming_uniform(a=sqrt(5))
    gives; B zero, so the adapted block starts equal to the base), drawn from (seed, part)."""
    generator = part_generator(seed, adapter_part(part))
    with torch.no_grad():
        for _, layer in sorted(_lora_layers(block), key=lambda item: item[0]):
            for adapter in layer.lora_A:
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1) * bound)
                b.zero_()


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Inside, ``module``'s LoRA layers compute their base layer alone (DPO's reference); their
    adapters' requires_grad is as it was afterwards."""
    layers = [layer for _, layer in _lora_layers(module)]
    trained = {id(p): p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
            for p in layer.parameters():
                p.requires_grad_(trained[id(p)])


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's adapter weights under PEFT's saved names."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(block)


def load_adapter_state(block: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put saved adapter weights into ``block``: exactly the names it has, or a clear error."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state(block))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise KeyError(
            f"adapters in {source} do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "were they trained with other --lora-target-modules?"
        )
    set_peft_model_state_dict(block, tensors)


def hf_block_path(family: Family, index: int) -> str:
    """Module path of global layer ``index`` inside HF's model (``gpt_neox.layers.3``)."""
    return family.shard_to_hf(layer_part(index), "").rstrip(".")
