"""Which global layers each stage holds.

By default stages are balanced by parameter count, counting the embedding on the first stage
and the LM head on the last (on small models they weigh as much as several layers).
"""

from __future__ import annotations

from functools import cache


def split_layers(
    num_layers: int,
    num_stages: int,
    layers_per_stage: int | tuple[int, ...] | None = None,
    layer_cost: int = 1,
    first_extra: int = 0,
    last_extra: int = 0,
) -> list[range]:
    """Consecutive layer ranges, one per stage.

    ``layers_per_stage`` (the ``--num-layers`` flag) is either one count for every stage or a
    count per stage. Otherwise the split minimises the heaviest stage's cost, where a stage
    costs ``layer_cost`` per layer plus ``first_extra`` (embedding) on the first and
    ``last_extra`` (head) on the last; among equally good splits, earlier stages take more
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
        sizes = _balanced_sizes(num_layers, num_stages, layer_cost, first_extra, last_extra)
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def _balanced_sizes(n: int, p: int, layer_cost: int, first_extra: int, last_extra: int) -> list[int]:
    def cost(stage: int, count: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == p - 1 else 0)
        return count * layer_cost + extra

    @cache
    def best(stage: int, start: int) -> int:
        """Smallest possible heaviest-stage cost for layers start.. on stages stage.."""
        if stage == p - 1:
            return cost(stage, n - start)
        return min(
            max(cost(stage, end - start), best(stage + 1, end)) for end in range(start + 1, n - (p - stage - 1) + 1)
        )

    sizes, start = [], 0
    for stage in range(p - 1):
        target = best(stage, start)
        ends = range(start + 1, n - (p - stage - 1) + 1)
        end = max(e for e in ends if max(cost(stage, e - start), best(stage + 1, e)) == target)
        sizes.append(end - start)
        start = end
    sizes.append(n - start)
    return sizes
