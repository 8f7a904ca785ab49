"""What makes a run this run, recorded in every checkpoint, so a relaunch never resumes another's.

A checkpoint folder left at its default (``model_checkpoints``) is easy to share by mistake: a
second run pointed at it would load the first run's weights and train them as its own. Every
checkpoint's trainer state therefore records the run's identity (``RunIdentity``): the model it
started from and the tokenizer (by what they hold, not their bytes or paths, so a copy converted
on another node agrees), the data mix (file names and weights), the objective and the settings
that shape what is trained (sequence length, seed; the LoRA settings are checked against the
checkpoint's own lora.json by trainer.checkpoint, with their own message). A resume with another
identity is refused, naming what differs; the learning-rate schedule (total steps, peak rate,
warm-up) may change, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.config import RunConfig

log = logging.getLogger(__name__)
# What a save adds that says nothing of the model: the library's version, where it was loaded from.
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "_attn_implementation"}
ROWS = 64  # leading rows of each embedding tensor hashed: a fine-tuned and a base model differ there


def model_fingerprint(folder: str | Path, weights: bool = True) -> str:
    """A short hash of what a model folder holds, by meaning, so copies converted apart agree:
    its config without volatile keys and (``weights``) the first rows of its embedding tensors."""
    folder = Path(folder)
    digest = hashlib.sha256()
    config_path = folder / "config.json"
    if config_path.is_file():
        config = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in VOLATILE_CONFIG_KEYS}
        digest.update(json.dumps(config, sort_keys=True).encode())
    embedding = folder / "embs.safetensors"
    if weights and embedding.is_file():
        from safetensors import safe_open

        with safe_open(str(embedding), framework="pt") as f:
            for name in sorted(f.keys()):
                rows = f.get_slice(name)[:ROWS]
                digest.update(name.encode() + rows.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(source: str | Path) -> str:
    """A short hash of a tokenizer's vocabulary and added tokens (not its config's paths and
    flags); a name that is no local folder (a hub id) is recorded as it is."""
    folder = Path(source)
    if not folder.is_dir():
        return str(source)
    digest = hashlib.sha256()
    fast = folder / "tokenizer.json"
    if fast.is_file():
        spec = json.loads(fast.read_text())
        digest.update(json.dumps([spec.get("model"), spec.get("added_tokens")], sort_keys=True).encode())
    for name in ("vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RunIdentity:
    model: str  # fingerprint of the starting weights' folder ("random init" past a config's hash)
    tokenizer: str
    data: tuple[tuple[str, float], ...]  # (file name, weight) of each task
    objective: str
    seq_length: int
    seed: int

    @classmethod
    def of(cls, cfg: RunConfig) -> RunIdentity:
        model = model_fingerprint(cfg.model.model_name, weights=cfg.model.load_pretrained)
        return cls(
            model=model if cfg.model.load_pretrained else f"random init of {model}",
            tokenizer=tokenizer_fingerprint(cfg.model.tokenizer_name),
            data=tuple((task.path.name, round(task.weight, 6)) for task in cfg.data.tasks),
            objective=cfg.objective.describe(),
            seq_length=cfg.data.seq_length,
            seed=cfg.data.seed,
        )

    def to_json(self) -> dict:
        return {**asdict(self), "data": [list(task) for task in self.data]}

    @classmethod
    def from_json(cls, fields: dict) -> RunIdentity:
        return cls(**{**fields, "data": tuple(tuple(task) for task in fields["data"])})


def _difference(key: str, theirs: object, mine: object) -> str:
    if key in ("model", "tokenizer"):  # fingerprints say nothing to a person: say what they stand for
        return f"{key}: not the one it started from"
    return f"{key} {theirs!r} there, {mine!r} now"


def schedule_of(cfg: RunConfig) -> dict[str, float]:
    return {"total_steps": cfg.optim.total_steps, "lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps}


def check_resume(cfg: RunConfig, state: dict, step: int, identity: RunIdentity) -> None:
    """Refuse a checkpoint of another run (one line: what differs and the ways out); warn once
    where the schedule changes. Only what the checkpoint recorded is compared (one from before
    identities were recorded passes)."""
    if "run" not in state:
        return
    ours, theirs = identity.to_json(), state["run"]
    differs = [_difference(key, theirs[key], ours.get(key)) for key in theirs if theirs[key] != ours.get(key)]
    if differs:
        where = Path(cfg.checkpoint.path)
        start_from = (
            "" if cfg.lora else  # a LoRA checkpoint holds adapters, not a model to start from
            f", or start a new run from its weights with --model-name {where / f'checkpoint_{step}'} (weights "
            "loaded) and a new --checkpoint-path"
        )  # fmt: skip
        raise ValueError(
            f"{where} holds checkpoints of another run ({'; '.join(differs)}); resume it with its own settings "
            f"or use another --checkpoint-path{start_from}"
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
