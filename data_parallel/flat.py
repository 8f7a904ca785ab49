"""A stage's trained parameters end to end in one flat index space, and the norms measured on it.

Every strategy measures the gradient norm the same way: one float64 norm per piece of a fixed cut
of the flat layout (each parameter cut at block boundaries that do not depend on dp), squared and
summed in a fixed order. A ZeRO-1 shard (data_parallel.sharded) holds whole blocks, so a sharded
replica computes exactly the norms of its pieces, and the clipping coefficient, hence every
weight, is the same bit for bit as without sharding.
"""

from __future__ import annotations

import math
from itertools import accumulate

import torch


def unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` back into ``tensors``."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class FlatLayout:
    """Trained parameters end to end in one flat index space, cut into norm pieces and shards.

    The block size depends on the parameter count only (not on dp), so the pieces are the same
    in every topology of a stage; a shard is a whole number of blocks.
    """

    def __init__(self, sizes: list[int], shards: int) -> None:
        self.sizes = sizes
        self.offsets = [0, *accumulate(sizes)][:-1]
        self.total = sum(sizes)
        # ~64 blocks on a small stage, 2^20 values each (4 MB) on a large one: few pieces to
        # norm, and at most a block of padding per shard
        self.block = min(2**20, max(2**10, 1 << max(0, math.ceil(self.total / 64) - 1).bit_length()))
        blocks = max(1, math.ceil(self.total / self.block))
        self.shard_size = math.ceil(blocks / shards) * self.block
        self.padded = self.shard_size * shards
        self.pieces: list[tuple[int, int, int]] = []  # (parameter index, start, stop) in the flat space
        for index, (offset, size) in enumerate(zip(self.offsets, sizes, strict=True)):
            start = offset
            while start < offset + size:
                stop = min(offset + size, (start // self.block + 1) * self.block)
                self.pieces.append((index, start, stop))
                start = stop

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, (shard + 1) * self.shard_size

    def norms(self, grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Each piece's norm (``piece_norm``) of the whole gradients ``grads``, one per parameter."""
        flat = [g.reshape(-1) for g in grads]
        offsets = self.offsets
        norms = [piece_norm(flat[i][a - offsets[i] : b - offsets[i]]) for i, a, b in self.pieces]
        return torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64, device=device)


def piece_norm(values: torch.Tensor) -> torch.Tensor:
    """One piece's norm, accumulated in float64 (a piece is at most 2^20 values, so the cast
    costs 8 MB at most): an fp32 norm of a million gradients rounds by up to 1e-5 of it (on
    SmolLM2-135M, torch's fp32 norms put the step's gradient norm 2-4e-5 low)."""
    return torch.linalg.vector_norm(values, dtype=torch.float64)


def squared_norm(norms: torch.Tensor, layout: FlatLayout, skip: int | None) -> torch.Tensor:
    """Sum of the pieces' squared norms, in piece order, leaving out parameter ``skip``."""
    keep = [k for k, (index, _, _) in enumerate(layout.pieces) if index != skip]
    return norms[keep].pow(2).sum()
