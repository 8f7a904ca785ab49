"""Where a rank sits: one grid of ``replicas x stages``, from which every group is sliced.

rank = replica * pp + stage

replica 0:  rank 0 (stage 0) -> rank 1 (stage 1) -> ... -> rank pp-1     (pipeline group)
replica 1:  rank pp          -> rank pp+1        -> ... -> rank 2pp-1
data-parallel group of stage s: ranks s, s+pp, s+2pp, ...                (strided)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    rank: int
    pipeline_size: int
    data_size: int

    def __post_init__(self) -> None:
        if self.pipeline_size < 1 or self.data_size < 1:
            raise ValueError("--pipeline-group-size and --data-group-size must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"--rank {self.rank} is outside 0..{self.world_size - 1} "
                f"(world = {self.pipeline_size} stages x {self.data_size} replicas)"
            )

    @property
    def world_size(self) -> int:
        return self.pipeline_size * self.data_size

    @property
    def stage(self) -> int:
        return self.rank % self.pipeline_size

    @property
    def replica(self) -> int:
        return self.rank // self.pipeline_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pipeline_size - 1

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.pipeline_size + stage

    def pipeline_ranks(self, replica: int) -> list[int]:
        return [self.rank_of(s, replica) for s in range(self.pipeline_size)]

    def only_other(self, ranks: list[int]) -> int | None:
        """The member of a two-rank group besides this rank (None in a larger group): a collective
        there fails by that rank's loss alone."""
        others = [r for r in ranks if r != self.rank]
        return others[0] if len(others) == 1 else None

    def data_ranks(self, stage: int) -> list[int]:
        return [self.rank_of(stage, r) for r in range(self.data_size)]

    def describe(self, rank: int) -> str:
        """``rank 3 (stage 1, replica 1)``: how errors and logs name a peer."""
        return f"rank {rank} (stage {rank % self.pipeline_size}, replica {rank // self.pipeline_size})"
