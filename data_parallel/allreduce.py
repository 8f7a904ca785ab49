"""--dp-mode allreduce with --dp-bucket-mb 0: every replica's gradients summed in one message after
the step, and the same update on every replica.

Exact: the gradients and the step's totals go as one fp32 all-reduce. With --dp-compress the
step's totals and a tied copy still go exactly (compressed, the two pipeline ends would round
their copies apart), and the rest as one compressed message (data_parallel.compressed).
"""

from __future__ import annotations

import torch

from comm.process_group import Communicator
from data_parallel.base import GradientSync, Trained, unscale
from data_parallel.compressed import CompressedSums
from data_parallel.config import DataParallelConfig
from data_parallel.flat import unflatten


class AllReduce(GradientSync):
    def __init__(
        self,
        cfg: DataParallelConfig,
        trained: Trained,
        comm: Communicator | None,
        device: torch.device,
        messages: int = 1,
    ) -> None:
        """``messages``: how many compressed messages a step sends (each with its own error feedback)."""
        super().__init__(trained, comm, device)
        # a run of one replica sums nothing (a rank joining an elastic run gets its comm later: it joins replicas)
        self.summed = comm is None or comm.topo.data_size > 1
        self.compressed = CompressedSums(cfg, messages) if self.summed and cfg.compress != "none" else None
        # what the sum copies for a moment: the gradients as one flat message (or, compressed, its temporaries)
        self.sum_bytes = 4 * self.layout.total if self.summed else 0

    def reduce(self, totals: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss = totals.to(self.device).reshape(-1)
        unscale((p.grad for p in self.params), scale)
        if self.replicas == 1:  # nothing to sum: no copy of the gradients either
            return loss.detach().cpu(), self.squared_norm()
        exact = [p.grad for p in self.params if self.compressed is None or p is self.tied]
        summed = self._sum_exact(exact, loss)  # one message: the exact gradients and the loss
        if self.compressed is not None:
            rest = [p.grad for p in self.params if p is not self.tied]
            packed = torch.cat([g.reshape(-1) for g in rest])
            unflatten(self.compressed.sum(self.comm, 0, packed).to(packed), rest)
        return summed.cpu(), self.squared_norm()

    def _sum_exact(self, grads: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """All-reduce ``grads`` (in place) and the loss (totals) as one message; returns the summed loss."""
        flat = torch.cat([*(g.reshape(-1) for g in grads), loss.to(grads[0] if grads else loss)])
        self.comm.all_reduce_data(flat)
        unflatten(flat[: -loss.numel()], grads)
        return flat[-loss.numel() :].detach()

    def zero_grad(self) -> None:
        super().zero_grad()
        if self.compressed is not None:
            self.compressed.mark()

    def rollback(self) -> None:
        if self.compressed is not None:
            self.compressed.rollback()
