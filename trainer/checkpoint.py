"""Training checkpoints keyed by global layer: any pp x dp can resume any checkpoint.

    <root>/checkpoint_<step>.tmp/    being written; never read, removed when that step is saved again
    <root>/checkpoint_<step>/        complete: renamed from .tmp after every stage has written
        (a layer-sharded model directory: config.json, tokenizer, embs/layer_<i>/lm_head), plus
        optim_<part>.safetensors     AdamW moments and step count of that part's parameters
        (under LoRA: lora_layer_<i> adapters instead of the parts, and lora.json naming the
        spec and the base model directory the adapters belong to)
        trainer_state.json           step, data stream position, loss scale
        manifest_stage<s>.json       bytes and sha256 of every file stage s wrote
    <root>/latest                    the newest complete step, written last

Who writes: the ranks whose --checkpoint-path is one folder form a disk (trainer.resume
finds them at start-up). On every disk, for every stage, the lowest replica of that stage with
a rank there writes the stage's files (under --shard-optimizer the replicas first gather each
part's optimizer state, so the files are the same as without sharding), and the disk's lowest
rank writes the run's files (trainer state, config, tokenizer). On a folder every rank shares
that is replica 0; on sites that share nothing, one replica per site, every site holds every
stage, so with dp >= 2 each stage's state is on dp machines. A checkpoint is committed when
every rank has written, synced and reported its manifest to the others over the process
group; only then does each disk's lowest rank rename it into place and move ``latest``.

Under --dp-mode diloco the replicas' weights and inner AdamW state differ between syncs, so
every replica writes its own: replica 0 the files above, replica r > 0 the same names prefixed
``replica<r>_`` (and ``manifest_stage<s>_replica<r>.json``); each also writes
``outer_<part>.safetensors`` (prefixed likewise): the anchor and outer momentum of the part's
parameters, and the pending sum of a sync in flight (data_parallel.diloco). A replica without files
of its own (the run had fewer replicas, or another mode) resumes as a copy of replica 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from comm.process_group import Communicator
from comm.topology import Topology
from modules.layout import atomic_write_text, checkpoint_dir, copy_model_files, latest_step, load_part, save_part
from modules.lora import ADAPTER_CONFIG, LoraSpec
from pipeline.stage import Stage
from trainer.optimizer import StageOptimizer

log = logging.getLogger(__name__)
OPTIM_PREFIX = "optim_"
TRAINER_STATE = "trainer_state.json"
MANIFEST_GLOB = "manifest_stage*.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted; the message names the file and a way out."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint some rank could not write (no space, an I/O error): it was abandoned on every
    rank, and ``latest`` and the earlier checkpoints are as they were."""


@dataclass(frozen=True)
class Disks:
    """Which ranks share a checkpoint folder: ``disk_of[r]`` is the lowest rank sharing rank r's."""

    disk_of: tuple[int, ...]

    @property
    def shared(self) -> bool:
        return len(set(self.disk_of)) == 1

    def owner(self, rank: int) -> bool:
        """The rank that makes, renames and prunes its disk's checkpoint folders."""
        return self.disk_of[rank] == rank

    def writes(self, topo: Topology, every_replica: bool) -> bool:
        """Whether this rank writes its stage's files (module docstring: who writes)."""
        if every_replica:
            return True
        disk = self.disk_of[topo.rank]
        return topo.rank == min(r for r in topo.data_ranks(topo.stage) if self.disk_of[r] == disk)

    def describe(self) -> str:
        if self.shared:
            return "one checkpoint folder shared by every rank"
        groups = {d: [r for r, e in enumerate(self.disk_of) if e == d] for d in sorted(set(self.disk_of))}
        return f"no shared checkpoint folder: {len(groups)} folders, ranks " + " | ".join(map(str, groups.values()))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_steps(root: Path) -> list[int]:
    """Steps of the finished (renamed, with a manifest) checkpoints under ``root``, ascending."""
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _CHECKPOINT_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and any(entry.glob(MANIFEST_GLOB)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def replica_prefix(replica: int) -> str:
    """What replica ``replica``'s own files are prefixed with under DiLoCo (module docstring)."""
    return f"replica{replica}_" if replica else ""


def save_checkpoint(
    root: Path,
    step: int,
    stage: Stage,
    optimizer: StageOptimizer,
    comm: Communicator,
    trainer_state: dict | None,
    source_dir: str,
    disks: Disks,
    keep: int = 0,
) -> None:
    """Write this rank's share of checkpoint ``step`` (``Disks.writes``; where the optimizer's
    strategy says so, every replica its own files, and the strategy's own state beside them) into
    ``checkpoint_<step>.tmp``. Once every rank
    has reported its manifest, each disk's owner renames the folder into place and moves
    ``latest``; ``keep`` > 0 prunes older checkpoints. ``trainer_state`` is rank 0's."""
    topo = comm.topo
    owner = disks.owner(topo.rank)
    tmp = root / f"checkpoint_{step}.tmp"
    writing = _Writes(root)  # why this rank could not write its share (a full disk, an I/O error)
    if owner:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: never mix its files with ours
        with writing.attempt():
            tmp.mkdir(parents=True)
    # rank 0's trainer state reaches every disk's owner; the gather is also the barrier after the mkdirs
    trainer_state = comm.all_gather_object(trainer_state)[0]

    written: list[Path] = []
    own_files = optimizer.sync.replica_files
    writes = disks.writes(topo, every_replica=own_files)
    prefix = replica_prefix(topo.replica) if own_files else ""
    for part, module in stage.saved_parts().items() if writes or optimizer.sharded else []:
        # under sharding the writing replica gathers each part's optimizer state from every
        # replica: every rank takes part in each gather, whatever failed on its disk
        moments = optimizer.state_tensors(module)
        if not writes or writing.failed:
            continue
        files = [(part, stage.saved_state(module)), (OPTIM_PREFIX + part, moments)]
        files += [(kind + part, piece.state_tensors(module)) for kind, piece in optimizer.sync.own_state().items()]
        with writing.attempt():
            for name, tensors in files:
                written.append(save_part(tmp, prefix + name, tensors))
    if owner and not writing.failed:  # the run's own files, on every disk
        with writing.attempt():
            written += _run_files(tmp, trainer_state, source_dir, stage)
    if not writing.failed:
        with writing.attempt():
            _write_manifest(tmp, written, topo, own_files)
    # the commit: every rank has written, synced and reported its manifest to the others, or
    # some rank reports why it could not, and every rank abandons the checkpoint
    reports = comm.all_gather_object(writing.why)
    failed = [(rank, why) for rank, why in enumerate(reports) if why is not None]
    if failed:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)  # what was written of it: the space it took is free again
        latest = latest_step(root)
        rank, why = failed[0]
        raise CheckpointWriteError(
            f"checkpoint {step} could not be written ({topo.describe(rank)}: {why}); it was abandoned on every "
            f"rank and {root / 'latest'} still names "
            f"{f'step {latest}' if latest is not None else 'no checkpoint'}: free space there or give another "
            "--checkpoint-path"
        )

    if owner:
        final = checkpoint_dir(root, step)
        if final.exists():  # an identical step of this run, finished before a crash moved latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", f"{step}\n")
        log.info("saved checkpoint %s", final)
        if keep > 0:
            steps = complete_steps(root)
            # oldest first, and never a step newer than this one (left from before latest was rewound)
            for old in [s for s in steps if s < step][: max(0, len(steps) - keep)]:
                shutil.rmtree(checkpoint_dir(root, old), ignore_errors=True)


class _Writes:
    """A rank's writes of one checkpoint: the first that fails (an OSError: no space, an I/O
    error) is kept as a line naming the file, the reason and the room on that disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.why: str | None = None

    @property
    def failed(self) -> bool:
        return self.why is not None

    @contextmanager
    def attempt(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            self.why = f"{err.filename or self.root}: {err.strerror or type(err).__name__}{self._room()}"

    def _room(self) -> str:
        """The free space on the disk, and what the last checkpoint there took: the room needed."""
        try:
            free = shutil.disk_usage(self.root).free
            last = latest_step(self.root)
            took = sum(f.stat().st_size for f in checkpoint_dir(self.root, last).iterdir()) if last is not None else 0
        except OSError:  # the disk cannot even say: the error itself is the message
            return ""
        return f"; {_size(free)} free there" + (f", the last checkpoint took {_size(took)}" if took else "")


def _size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _run_files(tmp: Path, trainer_state: dict, source_dir: str, stage: Stage) -> list[Path]:
    """The run's own files of a checkpoint (trainer state, config, tokenizer; LoRA's spec)."""
    atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state))
    files = [tmp / TRAINER_STATE, *copy_model_files(source_dir, tmp)]
    if stage.lora is not None:
        atomic_write_text(tmp / ADAPTER_CONFIG, stage.lora.to_json(str(Path(source_dir).resolve())))
        files.append(tmp / ADAPTER_CONFIG)
    return files


def _write_manifest(tmp: Path, written: list[Path], topo: Topology, per_replica: bool) -> None:
    """Sync what this rank wrote and record its bytes and sha256 in its manifest (if it wrote)."""
    manifest = {}
    for path in written:
        _fsync(path)
        manifest[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    if manifest:
        suffix = f"_replica{topo.replica}" if per_replica and topo.replica else ""
        atomic_write_text(tmp / f"manifest_stage{topo.stage}{suffix}.json", json.dumps(manifest, indent=1))


def manifest_entries(directory: Path) -> dict[str, dict]:
    """Every file the manifests in ``directory`` list: name -> bytes and sha256."""
    entries: dict[str, dict] = {}
    for fragment in sorted(directory.glob(MANIFEST_GLOB)):
        entries.update(json.loads(fragment.read_text()))
    return entries


def _verify(directory: Path, names: list[str], root: Path, step: int) -> None:
    """Check the files this rank reads against the manifests; a mismatch names the file."""
    manifest = manifest_entries(directory)
    earlier = [s for s in complete_steps(root) if s < step]
    fallback = (
        f"the previous checkpoint is step {earlier[-1]}: write {earlier[-1]} into {root / 'latest'} to resume from it"
        if earlier
        else "there is no earlier checkpoint to fall back to"
    )
    if not manifest:
        raise CheckpointError(f"{directory} has no manifest: it is incomplete or damaged; {fallback}")
    for name in names:
        path = directory / name
        entry = manifest.get(name)
        if entry is None or not path.is_file():
            raise CheckpointError(f"{path} is missing from checkpoint {step}; {fallback}")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} is damaged (size or checksum differs from the manifest); {fallback}")


def check_same_kind(directory: Path, lora: LoraSpec | None, base_model: str | None) -> None:
    """A LoRA run resumes LoRA adapters of the same shape; a full run, full weights."""
    try:
        saved = LoraSpec.read(directory)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if saved is None and lora is not None:
        raise CheckpointError(
            f"{directory} holds full fine-tuning weights, not LoRA adapters; drop the --lora-* flags "
            "to resume it, or choose a new --checkpoint-path for a LoRA run"
        )
    if saved is not None and lora is None:
        raise CheckpointError(
            f"{directory} holds LoRA adapters (rank {saved[0].rank}); pass the same --lora-* flags to resume "
            "it, or choose a new --checkpoint-path for full fine-tuning"
        )
    if saved is not None and saved[0] != lora:
        raise CheckpointError(
            f"{directory} holds LoRA adapters of {saved[0]}, but this run asks for {lora}; "
            "pass the same --lora-* flags or choose a new --checkpoint-path"
        )
    if saved is not None and base_model is not None and Path(saved[1]) != Path(base_model).resolve():
        # paths may differ between nodes of one job, so this is a warning, not a refusal
        log.warning("%s: adapters trained on base %s now resume on --model-name %s; they must be the same model",
                    directory, saved[1], base_model)  # fmt: skip


def load_checkpoint(
    root: Path,
    stage: Stage,
    optimizer: StageOptimizer,
    base_model: str | None = None,
    replica: int = 0,
) -> tuple[int, dict] | None:
    """Restore weights (under LoRA: adapters over ``base_model``, already loaded) and optimizer
    state from ``<root>/latest``; None when there is none. Where the optimizer's strategy saves
    files per replica, replica ``replica``'s own where there are any; and the strategy's own state."""
    step = latest_step(root)
    if step is None:
        return None
    directory = checkpoint_dir(root, step)
    if not directory.is_dir():
        raise CheckpointError(f"{root / 'latest'} names step {step} but {directory} does not exist")
    check_same_kind(directory, stage.lora, base_model)
    parts = list(stage.saved_parts())
    prefix = replica_prefix(replica) if optimizer.sync.replica_files else ""
    if prefix and not (directory / f"{prefix}{OPTIM_PREFIX}{parts[0]}.safetensors").is_file():
        log.info("%s holds no files of replica %d: it resumes as a copy of replica 0", directory, replica)
        prefix = ""
    own = optimizer.sync.own_state()
    held = {
        kind: piece for kind, piece in own.items() if (directory / f"{prefix}{kind}{parts[0]}.safetensors").is_file()
    }
    kinds = [prefix, prefix + OPTIM_PREFIX] + [prefix + kind for kind in held]
    names = [f"{kind}{p}.safetensors" for kind in kinds for p in parts] + [TRAINER_STATE]
    _verify(directory, names + ([ADAPTER_CONFIG] if stage.lora else []), root, step)
    stage.load_saved(str(directory), prefix)
    for part, module in stage.saved_parts().items():
        name = prefix + OPTIM_PREFIX + part
        try:
            optimizer.load_state_tensors(module, load_part(directory, name))
            for kind, piece in held.items():
                name = prefix + kind + part
                piece.load_state_tensors(module, load_part(directory, name), step)
        except ValueError as err:
            raise CheckpointError(f"{directory / name}.safetensors: {err}") from None
    for kind, piece in own.items():
        if kind not in held:
            log.info("%s holds no %s: it starts from the weights", directory, piece.what)
            piece.reset()
    state = json.loads((directory / TRAINER_STATE).read_text())
    return step, state
