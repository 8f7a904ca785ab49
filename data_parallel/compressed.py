"""--dp-compress: the replicas' sum of a flat message through a lossy codec with error feedback.

Used by the all-reduce strategies (one message after the step, or one per bucket) and by DiLoCo
(one per fragment of its pseudo-gradient); the codecs themselves are comm.compress's.
"""

from __future__ import annotations

import torch

from comm.compress import GradientCompressor
from comm.process_group import Communicator
from data_parallel.config import DataParallelConfig


def compressed_sum(comm: Communicator, compressor: GradientCompressor, packed: torch.Tensor) -> torch.Tensor:
    """The replicas' sum of ``packed`` through ``compressor`` (comm.compress.GradientCompressor):
    two replicas all-gather their payloads; more sum 1/n chunks in two compressed rounds, so
    each sends about two payloads' worth whatever n is, where an all-gather sends n - 1."""
    n = comm.topo.data_size
    if n == 2:  # the same bytes either way, and one rounding instead of two
        return compressor.decode_sum(comm.all_gather_data(compressor.encode(packed)), packed.numel())
    length = compressor.chunk_length(packed.numel(), n)
    parts = compressor.encode_parts(packed, n)
    # component j of every part, stacked: slice i goes to replica i, which sums chunk i
    received = comm.all_to_all_data([torch.stack(component) for component in zip(*parts, strict=True)])
    mine = compressor.decode_sum([[c[i] for c in received] for i in range(n)], length)
    gathered = comm.all_gather_data(compressor.encode_chunk_sum(mine))
    return torch.cat([compressor.decode_sum([payload], length) for payload in gathered])[: packed.numel()]


class CompressedSums:
    """One compressor (its own error feedback) per message a strategy sends each step."""

    def __init__(self, cfg: DataParallelConfig, messages: int) -> None:
        self.compressors = [GradientCompressor(cfg.compress, cfg.topk_ratio) for _ in range(messages)]

    def sum(self, comm: Communicator, message: int, flat: torch.Tensor) -> torch.Tensor:
        """Message ``message``'s sum over the replicas (a new tensor of ``flat``'s length)."""
        return compressed_sum(comm, self.compressors[message], flat)

    def mark(self) -> None:
        for compressor in self.compressors:
            compressor.mark()  # a step given up before its sums rolls back to here, not to the step before

    def rollback(self) -> None:
        for compressor in self.compressors:
            compressor.rollback()  # a skipped step must not poison the error feedback
