"""Checkpoint folders with or without a shared file system, and the step a run resumes from.

Every rank names a ``--checkpoint-path``; the ranks whose paths are one folder (one file
system, or one machine) form a disk. ``probe_disks`` finds the disks at start-up: each rank
leaves a file named for it, and each says whose files it sees. One disk is today's shared
folder; several are sites that share nothing.

Who writes, and when a checkpoint counts as committed: trainer.checkpoint.

Resume (``agree_on_resume``): every rank reports the complete checkpoints of its folder and
their manifests; the run resumes from the newest step (at most the newest ``latest`` of any
disk) whose files every rank needs exist on some disk. A rank whose disk lacks one (a node
crashed before renaming, or came back with an empty disk, or the topology changed) receives it
from a rank whose disk has it, over torch.distributed, checks its size and sha256 against the
sender's manifest, and stores it in its own folder; every disk's ``latest`` then names that step.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from comm.process_group import Communicator
from modules.layout import atomic_write_text, checkpoint_dir, latest_step
from modules.lora import ADAPTER_CONFIG
from objectives import make_objective
from pipeline.stage import saved_part_names
from trainer.checkpoint import (
    OPTIM_PREFIX,
    TRAINER_STATE,
    CheckpointError,
    Disks,
    complete_steps,
    file_sha256,
    manifest_entries,
    replica_prefix,
)
from trainer.config import RunConfig

log = logging.getLogger(__name__)
FETCH_CHUNK = 64 * 2**20  # bytes a fetched file crosses in at a time: memory stays bounded


def probe_disks(comm: Communicator, path: Path) -> Disks:
    """Find which ranks' ``--checkpoint-path`` is one folder (module docstring); a folder a
    rank cannot write stops every rank with the reason."""
    topo = comm.topo
    token = comm.all_gather_object(uuid.uuid4().hex)[0]  # rank 0's, for every rank's file name
    probe = path / f".disk-{token}-{topo.rank}"
    problem = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.touch()
    except OSError as err:
        problem = f"{topo.describe(topo.rank)} cannot write --checkpoint-path {path} ({err.strerror})"
    problems = [p for p in comm.all_gather_object(problem) if p]  # also: every probe is in place
    if problems:
        raise CheckpointError("cannot start: " + "; ".join(problems))
    seen = [r for r in range(topo.world_size) if (path / f".disk-{token}-{r}").exists()]
    everyone = comm.all_gather_object(seen)  # also: every rank has looked
    probe.unlink()
    return Disks(tuple(min(s) for s in everyone))


def needed_files(cfg: RunConfig, layers: range) -> list[list[str]]:
    """The files this rank loads to resume, as alternatives in order of preference: under
    DiLoCo its replica's own files with their outer state, else replica 0's (and a checkpoint
    of another mode has no outer state)."""
    topo = cfg.topology
    extra = make_objective(cfg.objective).parts  # the parts the objective adds to the last stage
    parts = saved_part_names(layers, topo.is_first_stage, topo.is_last_stage, cfg.lora is not None, extra)
    run_files = [TRAINER_STATE] + ([ADAPTER_CONFIG] if cfg.lora is not None else [])

    def files(prefix: str, kinds: tuple[str, ...]) -> list[str]:
        return [f"{prefix}{kind}{p}.safetensors" for kind in kinds for p in parts] + run_files

    if not cfg.dp.replica_files:
        return [files("", ("", OPTIM_PREFIX, *cfg.dp.own_prefixes))]
    with_own, without = ("", OPTIM_PREFIX, *cfg.dp.own_prefixes), ("", OPTIM_PREFIX)
    return [files(replica_prefix(topo.replica), with_own), files("", with_own), files("", without)]


def agree_on_resume(comm: Communicator, cfg: RunConfig, layers: range, disks: Disks) -> int | None:
    """Agree on the step to resume from and bring every file a rank needs onto its disk (module
    docstring); returns the step, None for a fresh start."""
    topo, root = comm.topo, cfg.checkpoint.path
    newest = latest_step(root)
    if disks.shared:  # every rank sees the same files: load_checkpoint reads latest, as ever
        return newest
    local = {s: manifest_entries(checkpoint_dir(root, s)) for s in complete_steps(root) if newest and s <= newest}
    reports = comm.all_gather_object((local, needed_files(cfg, layers)))
    candidates = sorted({s for steps, _ in reports for s in steps}, reverse=True)
    if not candidates:
        return None  # no checkpoint anywhere: a fresh start
    for step in candidates:
        holders, choices = _holders(reports, step)
        if all(c is not None for c in choices):
            break
    else:  # starting afresh would write over what the folders hold
        holders, choices = _holders(reports, candidates[0])
        rank = choices.index(None)
        missing = next(n for n in reports[rank][1][-1] if n not in holders)
        raise CheckpointError(
            f"no checkpoint step has every file the ranks need in some folder (step {candidates[0]}: none "
            f"holds {missing} for {topo.describe(rank)}); bring back the folder that held it, or start with "
            "a new --checkpoint-path (nothing was overwritten)"
        )
    # what each disk lacks of what its ranks need (and, for its owner, the run's other files):
    # the disk's lowest rank that needs a file receives it from the lowest rank whose disk has it
    transfers: dict[tuple[int, str], tuple[int, int]] = {}  # (disk, file) -> (receiver, sender)
    for rank, needs in enumerate(choices):
        disk = disks.disk_of[rank]
        there = reports[disk][0].get(step, {})
        extra = [n for n in holders if not n.endswith(".safetensors")] if disks.owner(rank) else []
        for name in [*needs, *extra]:
            if name not in there:
                transfers.setdefault((disk, name), (rank, holders[name][0]))
    fetched = _transfer(comm, root, step, transfers, holders)
    if fetched:
        log.info("fetched %d files of checkpoint %d from peers: %s", len(fetched), step, ", ".join(fetched))
    comm.barrier_all()  # every disk holds what its ranks need
    if disks.owner(topo.rank) and newest != step:
        log.info("%s: resuming from step %d, agreed over the process group (this folder's latest was %s)",
                 root, step, newest)  # fmt: skip
        atomic_write_text(root / "latest", f"{step}\n")
    return step


def _holders(reports: list, step: int) -> tuple[dict[str, tuple[int, dict]], list[list[str] | None]]:
    """Who holds each file of checkpoint ``step`` (the lowest rank whose folder has it, and its
    manifest entry), and each rank's first set of needed files all held somewhere (or None)."""
    holders: dict[str, tuple[int, dict]] = {}
    for rank, (steps, _) in enumerate(reports):
        for name, entry in steps.get(step, {}).items():
            holders.setdefault(name, (rank, entry))
    choices = [next((a for a in alternatives if all(n in holders for n in a)), None) for _, alternatives in reports]
    return holders, choices


def _transfer(
    comm: Communicator, root: Path, step: int, transfers: dict[tuple[int, str], tuple[int, int]], holders: dict
) -> list[str]:
    """Run every transfer in one order on every rank (so none waits on another crosswise); the
    receiver checks each file against the sender's manifest before it enters its folder."""
    rank, fetched = comm.topo.rank, []
    directory = checkpoint_dir(root, step)
    for (_, name), (receiver, sender) in sorted(transfers.items()):
        size, what = holders[name][1]["bytes"], f"{name} of checkpoint {step}"
        chunks = [(a, min(size, a + FETCH_CHUNK)) for a in range(0, size, FETCH_CHUNK)]
        if rank == sender:  # the manifest's size, chunk by chunk (a shorter file is padded: its hash fails)
            with open(directory / name, "rb") as f:
                for a, b in chunks:
                    comm.send_bytes(f.read(b - a).ljust(b - a, b"\0"), receiver, what)
        elif rank == receiver:
            directory.mkdir(parents=True, exist_ok=True)
            part = directory / f"{name}.fetch"
            with open(part, "wb") as f:
                for a, b in chunks:
                    f.write(comm.recv_bytes(b - a, sender, what))
                f.flush()
                os.fsync(f.fileno())
            if file_sha256(part) != holders[name][1]["sha256"]:
                part.unlink()
                raise CheckpointError(
                    f"{name} of checkpoint {step} from rank {sender} does not match its manifest; "
                    "check that rank's disk, or resume from an earlier step"
                )
            os.replace(part, directory / name)
            fetched.append(name)
    if fetched:  # listed only once in place, so a crash mid-fetch never claims a missing file
        manifest = {name: holders[name][1] for name in fetched}
        atomic_write_text(directory / f"manifest_stage_fetched_rank{rank}.json", json.dumps(manifest, indent=1))
    return fetched
