"""Training checkpoints keyed by global layer: any pp x dp can resume any checkpoint.

<root>/checkpoint_<step>/        a layer-sharded model directory, plus
    optim_<part>.safetensors     AdamW moments and step count of that part's parameters
    trainer_state.json           step and the data stream's position
<root>/latest                    the newest complete step, written last
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from comm.process_group import Communicator
from convert.layout import (
    atomic_write_text,
    checkpoint_dir,
    copy_model_files,
    latest_step,
    load_part,
    save_part,
)
from pipeline.stage import Stage

log = logging.getLogger(__name__)
OPTIM_PREFIX = "optim_"
TRAINER_STATE = "trainer_state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, param in module.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, module: nn.Module, tensors: dict) -> None:
    for name, param in module.named_parameters():
        prefix = f"{name}."
        state = {k[len(prefix) :]: v.to(param.device) for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            optimizer.state[param] = state


def save_checkpoint(
    root: Path,
    step: int,
    stage: Stage,
    optimizer: torch.optim.Optimizer,
    comm: Communicator,
    trainer_state: dict | None,
    source_dir: str,
) -> None:
    """Replica 0 writes its stage's parts; ``latest`` moves only after every stage has written."""
    topo = comm.topo
    if topo.replica != 0:
        return  # other replicas hold the same weights
    directory = checkpoint_dir(root, step)
    directory.mkdir(parents=True, exist_ok=True)
    for part, module in stage.parts().items():
        save_part(directory, part, module.state_dict())
        save_part(directory, OPTIM_PREFIX + part, _optimizer_tensors(optimizer, module))
    if trainer_state is not None:
        atomic_write_text(directory / TRAINER_STATE, json.dumps(trainer_state))
        copy_model_files(source_dir, directory)
    comm.barrier_pipeline()
    # Each rank of the pipeline writes the same content: correct on shared and local disks alike.
    atomic_write_text(root / "latest", f"{step}\n")
    log.info("saved checkpoint %s", directory)


def load_checkpoint(root: Path, stage: Stage, optimizer: torch.optim.Optimizer) -> tuple[int, dict] | None:
    """Restore weights and optimizer state from ``<root>/latest``; None when there is none."""
    step = latest_step(root)
    if step is None:
        return None
    directory = checkpoint_dir(root, step)
    stage.load_parts(str(directory))
    for part, module in stage.parts().items():
        _load_optimizer_tensors(optimizer, module, load_part(directory, OPTIM_PREFIX + part))
    state_path = directory / TRAINER_STATE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} is missing: the checkpoint of step {step} is incomplete")
    with open(state_path) as f:
        state = json.load(f)
    return step, state
