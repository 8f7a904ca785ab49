"""Which global layers each stage holds.

By default the split minimises the heaviest stage's cost, where a stage costs what its parts
cost: some layers, plus the embedding on the first stage and the head on the last (on small
models or large vocabularies they weigh as much as several layers). The caller says what a
part costs (the trainer: forward + backward FLOPs, trainer.startup.stage_costs) and may bound
each stage's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartWeights:
    """One measure (compute, bytes) of the embedding, one layer and the head."""

    embedding: float
    layer: float
    head: float

    def of_stage(self, stage: int, stages: int, layers: int) -> float:
        first, last = stage == 0, stage == stages - 1
        return layers * self.layer + (self.embedding if first else 0.0) + (self.head if last else 0.0)


EQUAL_LAYERS = PartWeights(embedding=0.0, layer=1.0, head=0.0)


def split_layers(
    num_layers: int,
    num_stages: int,
    layers_per_stage: int | tuple[int, ...] | None = None,
    cost: PartWeights = EQUAL_LAYERS,
    memory: Sequence[PartWeights] | None = None,
    limits: Sequence[float] | None = None,
) -> list[range]:
    """Consecutive layer ranges, one per stage.

    ``layers_per_stage`` (the ``--num-layers`` flag) is either one count for every stage or a
    count per stage. Otherwise the split minimises the heaviest stage's ``cost`` among the
    splits where every stage s's ``memory[s]`` stays within ``limits[s]`` (none fitting: the
    cheapest split, with a warning); among equally good splits, earlier stages take more
    layers (5 equal layers on 2 stages -> [0, 1, 2] and [3, 4]).
    """
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages but the model has only {num_layers} layers; "
            f"use --pipeline-group-size {num_layers} or fewer"
        )
    if isinstance(layers_per_stage, int):
        layers_per_stage = (layers_per_stage,)
    if layers_per_stage is not None:
        sizes = list(layers_per_stage) * num_stages if len(layers_per_stage) == 1 else list(layers_per_stage)
        if len(sizes) != num_stages or sum(sizes) != num_layers or min(sizes) < 1:
            raise ValueError(
                f"--num-layers {','.join(map(str, layers_per_stage))} does not split {num_layers} layers over "
                f"{num_stages} stages (give one count per stage, each >= 1, summing to {num_layers}; "
                "or omit it for a balanced split)"
            )
    else:
        sizes = None
        if memory is not None and limits is not None:

            def fits(stage: int, count: int) -> bool:
                return memory[stage].of_stage(stage, num_stages, count) <= limits[stage]

            sizes = _balanced_sizes(num_layers, num_stages, cost, fits)
            if sizes is None:
                log.warning(
                    "no split of %d layers over %d stages fits every stage's estimated memory (%s GB); "
                    "splitting by compute alone: consider more stages, --activation-checkpointing full "
                    "or --num-layers", num_layers, num_stages, ", ".join(f"{v / 1e9:.3g}" for v in limits),
                )  # fmt: skip
        if sizes is None:
            sizes = _balanced_sizes(num_layers, num_stages, cost, lambda stage, count: True)
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def _balanced_sizes(n: int, p: int, cost: PartWeights, fits) -> list[int] | None:
    """Layer counts minimising the heaviest stage's cost over the splits that fit (None: none does)."""
    inf = float("inf")

    def stage_cost(stage: int, count: int) -> float:
        return cost.of_stage(stage, p, count) if fits(stage, count) else inf

    @cache
    def best(stage: int, start: int) -> float:
        """Smallest possible heaviest-stage cost for layers start.. on stages stage.."""
        if stage == p - 1:
            return stage_cost(stage, n - start)
        ends = range(start + 1, n - (p - stage - 1) + 1)
        return min(max(stage_cost(stage, end - start), best(stage + 1, end)) for end in ends)

    if best(0, 0) == inf:
        return None
    sizes, start = [], 0
    for stage in range(p - 1):
        target = best(stage, start)
        ends = range(start + 1, n - (p - stage - 1) + 1)
        end = max(e for e in ends if max(stage_cost(stage, e - start), best(stage + 1, e)) == target)
        sizes.append(end - start)
        start = end
    sizes.append(n - start)
    return sizes
