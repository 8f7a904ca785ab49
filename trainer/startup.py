"""Before the first step: plan this rank's stage, then agree with every rank on a healthy start."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import torch

from comm.process_group import Communicator
from modules import Family, family_for, load_config
from pipeline.partition import split_layers
from trainer.config import RunConfig


class StartupError(RuntimeError):
    """A rank could not start; raised on every rank so none waits for it."""


@dataclass
class Plan:
    """What this rank computes, derived from the configs and the model's config.json."""

    family: Family
    model_config: object
    layers: range

    @property
    def tied(self) -> bool:
        return bool(getattr(self.model_config, "tie_word_embeddings", False))


def plan_stage(cfg: RunConfig) -> Plan:
    """Checks that need only the flags and config.json: identical on every rank, run before connecting."""
    model_config = load_config(cfg.model.model_name)
    family = family_for(cfg.model.model_type or model_config.model_type)
    if cfg.model.embedding_dim is not None and cfg.model.embedding_dim != model_config.hidden_size:
        raise ValueError(
            f"--embedding-dim {cfg.model.embedding_dim} != hidden size {model_config.hidden_size} in config.json; "
            "drop the flag or fix it"
        )
    limit = model_config.max_position_embeddings
    if family.learned_positions and cfg.data.seq_length > limit:
        raise ValueError(
            f"--seq-length {cfg.data.seq_length} is longer than the {limit} positions this {family.name} model "
            f"learned; use --seq-length {limit} or less"
        )
    embedding, layer, head = part_sizes(family, model_config)
    split = split_layers(
        model_config.num_hidden_layers,
        cfg.topology.pipeline_size,
        cfg.model.layers_per_stage,
        layer_cost=layer,
        first_extra=embedding,
        last_extra=head,
    )
    return Plan(family, model_config, split[cfg.topology.stage])


def part_sizes(family: Family, model_config: object) -> tuple[int, int, int]:
    """Parameter counts of the embedding, one layer and the head, without allocating them."""
    with torch.device("meta"):
        parts = (family.embedding(model_config), family.block(model_config, 0), family.head(model_config))
    return tuple(sum(p.numel() for p in part.parameters()) for part in parts)


def agree_on_start(comm: Communicator, cfg: RunConfig, step: int, error: str | None) -> list[str]:
    """Every rank shares its status; any failure or mismatch stops all ranks with its reason.

    Returns the host name of every rank.
    """
    probe = None
    if comm.topo.rank == 0 and error is None:
        # A file only rank 0 writes: every rank must see it, or checkpoints would scatter.
        cfg.checkpoint.path.mkdir(parents=True, exist_ok=True)
        probe = cfg.checkpoint.path / f".shared-check-{uuid.uuid4().hex}"
        probe.touch()
    status = {"error": error, "fingerprint": cfg.fingerprint(), "step": step, "host": socket.gethostname()}
    statuses = comm.all_gather_object({**status, "probe": probe.name if probe else None})
    _raise_problems(cfg, statuses)
    sees = comm.all_gather_object((cfg.checkpoint.path / statuses[0]["probe"]).exists())
    if probe is not None:
        probe.unlink()
    blind = [r for r, seen in enumerate(sees) if not seen]
    if blind:
        raise StartupError(
            f"ranks {blind} cannot see files that rank 0 writes in --checkpoint-path {cfg.checkpoint.path}; "
            "it must be one folder every rank reaches (a shared file system)"
        )
    return [s["host"] for s in statuses]


def _raise_problems(cfg: RunConfig, statuses: list[dict]) -> None:
    topo = cfg.topology
    problems = [f"{topo.describe(r)}: {s['error']}" for r, s in enumerate(statuses) if s["error"]]
    if not problems:
        odd = [r for r, s in enumerate(statuses) if s["fingerprint"] != statuses[0]["fingerprint"]]
        if odd:
            problems.append(
                f"ranks {odd} were started with other training flags than rank 0; launch every rank with the same flags"
            )
        steps = sorted({s["step"] for s in statuses})
        if len(steps) > 1:
            problems.append(f"ranks resume from different steps {steps}; give every rank the same checkpoint files")
    if problems:
        raise StartupError("cannot start: " + "; ".join(problems))


def set_threads(hosts: list[str]) -> int:
    """One thread per core this rank may use: cores divided among the ranks on this host."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()  # the user decided
    local_ranks = max(1, hosts.count(socket.gethostname()))
    threads = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    torch.set_num_threads(threads)
    return threads
