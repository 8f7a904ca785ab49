"""A model's stages run one after another in one process: the pipeline's arithmetic without its
transport, for checking a family against Hugging Face's model (``pipeline/check.py``, the tests).

    ids -> stage 0 -> stage 1 -> ... -> logits       (autograd flows straight through)

Where a tied input/output weight has a copy at each end, the copies get the sum of both ends'
gradients after the backward, and the copy is counted once in the gradient norm, as the
trainer does between ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from modules import Family
from pipeline.stage import Stage
from pipeline.tied import TiedCopy, sum_in_process


def even_split(num_layers: int, stages: int) -> list[range]:
    """Consecutive layers per stage, the first stages one layer lighter where they do not divide
    (the last stage also holds the head)."""
    base, extra = divmod(num_layers, stages)
    sizes = [base + (s >= stages - extra) for s in range(stages)]
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


class StageChain(nn.Module):
    """``splits[s]`` are stage s's global layers; the first holds the embedding, the last the head."""

    def __init__(self, family: Family, config: object, splits: Sequence[range]) -> None:
        super().__init__()
        if [i for split in splits for i in split] != list(range(config.num_hidden_layers)):
            raise ValueError(f"splits {list(splits)} do not cover layers 0..{config.num_hidden_layers - 1} in order")
        last = len(splits) - 1
        self.family = family
        self.stages = nn.ModuleList(
            Stage(family, config, split, is_first=s == 0, is_last=s == last) for s, split in enumerate(splits)
        )

    def parts(self) -> Iterator[tuple[str, nn.Module]]:
        for stage in self.stages:
            yield from stage.parts().items()

    def load(self, model_dir: str) -> None:
        """Every stage's parts from a layer-sharded directory."""
        for stage in self.stages:
            stage.load_parts(model_dir)

    def load_hf_state(self, state: dict[str, torch.Tensor]) -> None:
        """Every part from an HF-named state dict (a tied model's ``lm_head.weight`` included)."""
        by_part: dict[str, dict[str, torch.Tensor]] = {}
        for hf_key, tensor in state.items():
            part, local = self.family.hf_to_shard(hf_key)
            by_part.setdefault(part, {})[local] = tensor
        for part, module in self.parts():
            module.load_state_dict(by_part.get(part, {}), strict=True)

    def hf_state(self) -> dict[str, torch.Tensor]:
        """The weights under HF's in-memory names (a tied output weight is the embedding's)."""
        return {
            self.family.shard_to_hf(part, local): tensor
            for part, module in self.parts()
            for local, tensor in module.state_dict().items()
        }

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = input_ids
        for stage in self.stages:
            hidden = stage(hidden, position_ids)
        return hidden  # (micro, seq, vocab)

    def routed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits and, where the config asks for it, the routers' load-balancing loss
        (HF's ``aux_loss``, without the coefficient; modules.routing), else None."""
        balance = self.stages[0].balance
        if balance is None:
            return self(input_ids, position_ids), None
        hidden, sums = input_ids, balance.start(input_ids.device)
        for stage in self.stages:
            hidden, sums = stage.routed(hidden, sums, position_ids)
        return hidden, balance.loss(sums)

    def sum_tied_grads(self) -> None:
        """Each end's copy of a tied weight gets the sum of both ends' gradients (pipeline.tied)."""
        sum_in_process([TiedCopy(stage) for stage in self.stages])

    def clip_grads(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient as ``clip_grad_norm_`` scales one model's: by the norm over the
        trained parameters with a tied weight counted once (its head copy left out). Returns the
        norm before clipping."""
        trained = [p for p in self.parameters() if p.requires_grad]
        counted = trained
        for stage in self.stages:
            counted = TiedCopy(stage).counted(counted)
        norm = exact_norm([p.grad for p in counted])
        torch.nn.utils.clip_grads_with_norm_(trained, max_norm, norm)
        return norm


def exact_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The norm of all ``grads`` accumulated in float64 (an fp32 norm of many millions of values
    rounds by ~1e-5 of it), as the trainer's is."""
    return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).norm()
