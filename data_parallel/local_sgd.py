"""--dp-mode local: local SGD. Each replica steps on its own slice of every global batch, and every
--sync-every steps (and at the last) all replicas take the mean of the replicas' weights."""

from __future__ import annotations

import torch

from comm.process_group import Communicator
from data_parallel.base import StepsAlone, Trained
from data_parallel.config import DataParallelConfig
from data_parallel.flat import unflatten


class LocalSgd(StepsAlone):
    def __init__(self, cfg: DataParallelConfig, trained: Trained, comm: Communicator | None, device: torch.device,
                 total_steps: int) -> None:  # fmt: skip
        super().__init__(trained, comm, device)
        self.sync_every = cfg.sync_every
        self.total_steps = total_steps

    def due(self, step: int) -> bool:
        return step % self.sync_every == 0 or step == self.total_steps

    def end_of_step(self, step: int) -> None:
        if self.due(step):
            self.average_weights()

    def average_weights(self) -> None:
        """Every replica takes the mean of the replicas' weights."""
        with torch.no_grad():
            flat = torch.cat([p.reshape(-1) for p in self.params])
            self.comm.all_reduce_data(flat)
            unflatten(flat / self.replicas, list(self.params))
