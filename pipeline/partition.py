"""Which global layers each stage holds."""

from __future__ import annotations


def split_layers(num_layers: int, num_stages: int, layers_per_stage: int | None = None) -> list[range]:
    """Consecutive layer ranges, one per stage, as even as possible.

    Extra layers go to the earlier stages, because the last stage also carries the LM head
    (5 layers on 2 stages -> [0, 1, 2] and [3, 4]). ``layers_per_stage`` (the established
    ``--num-layers`` flag) asks for an exact count on every stage.
    """
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages but the model has only {num_layers} layers; "
            f"use --pipeline-group-size {num_layers} or fewer"
        )
    if layers_per_stage is not None:
        if layers_per_stage * num_stages != num_layers:
            raise ValueError(
                f"--num-layers {layers_per_stage} x {num_stages} stages = {layers_per_stage * num_stages}, "
                f"but the model has {num_layers} layers; omit --num-layers for an even split"
            )
        sizes = [layers_per_stage] * num_stages
    else:
        base, extra = divmod(num_layers, num_stages)
        sizes = [base + (1 if s < extra else 0) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]
