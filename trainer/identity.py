"""What makes a run this run, recorded in every checkpoint, so a relaunch never resumes another's.

A checkpoint folder left at its default (``model_checkpoints``) is easy to share by mistake: a
second run pointed at it would load the first run's weights and train them as its own. Every
checkpoint's trainer state therefore records the run's identity (``RunIdentity``): the model it
started from and the tokenizer (by content, not path, so another node's copy agrees), the data
mix (file names and weights), the objective and the settings that shape what is trained
(sequence length, seed, LoRA). A resume with another identity is refused, naming what differs;
the learning-rate schedule (total steps, peak rate, warm-up) may change, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.config import RunConfig

log = logging.getLogger(__name__)
# Files whose bytes identify a model folder: its config and the start of its embedding shard (a
# fine-tuned and a base model of one shape share the config, never their embeddings' bytes).
MODEL_FILES = ("config.json", "embs.safetensors", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")
HEAD_BYTES = 1 << 20  # a file's first MiB and its size: cheap for a 10 GB shard, unique in practice


def files_fingerprint(folder: str | Path, names: tuple[str, ...]) -> str:
    """A short hash of the named files that exist in ``folder``: each one's name, size and first MiB."""
    digest = hashlib.sha256()
    for name in names:
        path = Path(folder) / name
        if path.is_file():
            with open(path, "rb") as f:
                digest.update(f"{name}:{path.stat().st_size}:".encode() + f.read(HEAD_BYTES))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RunIdentity:
    model: str  # fingerprint of the starting weights' folder ("random init" past a config's hash)
    tokenizer: str
    data: tuple[tuple[str, float], ...]  # (file name, weight) of each task
    objective: str
    seq_length: int
    seed: int
    lora: str | None  # the adapter spec, as flags give it

    @classmethod
    def of(cls, cfg: RunConfig) -> RunIdentity:
        model = files_fingerprint(cfg.model.model_name, MODEL_FILES)
        if not cfg.model.load_pretrained:
            model = "random init of " + files_fingerprint(cfg.model.model_name, ("config.json",))
        return cls(
            model=model,
            tokenizer=files_fingerprint(cfg.model.tokenizer_name, TOKENIZER_FILES),
            data=tuple((task.path.name, round(task.weight, 6)) for task in cfg.data.tasks),
            objective="lm",
            seq_length=cfg.data.seq_length,
            seed=cfg.data.seed,
            lora=str(sorted(asdict(cfg.lora).items())) if cfg.lora else None,
        )

    def to_json(self) -> dict:
        return {**asdict(self), "data": [list(task) for task in self.data]}

    @classmethod
    def from_json(cls, fields: dict) -> RunIdentity:
        return cls(**{**fields, "data": tuple(tuple(task) for task in fields["data"])})


def _difference(key: str, theirs: object, mine: object) -> str:
    if key in ("model", "tokenizer"):  # fingerprints say nothing to a person: say what they stand for
        return f"{key} files differ from the ones it started from"
    return f"{key} {theirs!r} there, {mine!r} now"


def schedule_of(cfg: RunConfig) -> dict[str, float]:
    return {"total_steps": cfg.optim.total_steps, "lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps}


def check_resume(cfg: RunConfig, state: dict, step: int) -> None:
    """Refuse a checkpoint of another run (one line: what differs and the two ways out); warn
    once where the schedule changes. A checkpoint from before identities were recorded passes."""
    if "run" not in state:
        return
    ours, theirs = RunIdentity.of(cfg).to_json(), state["run"]
    differs = [_difference(key, theirs.get(key), mine) for key, mine in ours.items() if theirs.get(key) != mine]
    if differs:
        where = Path(cfg.checkpoint.path)
        raise ValueError(
            f"{where} holds checkpoints of another run ({'; '.join(differs)}); resume it with its own settings, "
            f"use another --checkpoint-path, or start a new run from its weights with --model-name "
            f"{where / f'checkpoint_{step}'} and a new --checkpoint-path"
        )
    before, now = state.get("schedule", {}), schedule_of(cfg)
    changes = [
        f"{flag} {before[flag]:g} -> {now[flag]:g}" for flag in now if flag in before and before[flag] != now[flag]
    ]
    if changes:
        log.warning(
            "resuming at step %d with another learning-rate schedule (%s): the rate follows the new one from here",
            step, ", ".join(changes),
        )  # fmt: skip
