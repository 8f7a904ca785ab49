"""The strategy a run's --dp-mode, --shard-optimizer and --dp-bucket-mb ask for."""

from __future__ import annotations

import torch

from comm.process_group import Communicator
from data_parallel.allreduce import AllReduce
from data_parallel.base import GradientSync, Trained
from data_parallel.buckets import Bucketed
from data_parallel.config import DataParallelConfig
from data_parallel.diloco import DiLoCoSync
from data_parallel.local_sgd import LocalSgd
from data_parallel.sharded import Sharded
from pipeline.stage import Stage


def make_sync(cfg: DataParallelConfig, trained: Trained, comm: Communicator | None, device: torch.device,
              stage: Stage, num_layers: int, total_steps: int) -> GradientSync:  # fmt: skip
    """``comm`` is None for a rank joining a live elastic run (it gets it through ``use``)."""
    if cfg.shard_optimizer:
        return Sharded(trained, comm, device)
    if cfg.mode == "local":
        return LocalSgd(cfg, trained, comm, device, total_steps)
    if cfg.mode == "diloco":
        return DiLoCoSync(cfg, trained, comm, device, stage, num_layers, total_steps)
    summed = comm is None or comm.topo.data_size > 1
    if summed and cfg.bucket_bytes > 0:
        return Bucketed(cfg, trained, comm, device)
    return AllReduce(cfg, trained, comm, device)
