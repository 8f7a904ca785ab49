"""The layer-sharded layout on disk: one file per part, keyed by global layer index.

    <dir>/config.json, tokenizer files
    <dir>/embs.safetensors            embedding            (legacy: pytorch_embs.pt)
    <dir>/layer_<i>.safetensors       global layer i       (legacy: pytorch_<i>.pt)
    <dir>/lm_head.safetensors         final norm + head    (legacy: pytorch_lm_head.pt)

Training checkpoints use the same layout (plus optimizer and trainer state), so every
checkpoint is itself a model directory that training and ``to_hf`` can read.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modules.family import EMBEDDING_PART, HEAD_PART

_LEGACY = {EMBEDDING_PART: "pytorch_embs.pt", HEAD_PART: "pytorch_lm_head.pt"}
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors|pytorch_(\d+)\.pt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def part_file(model_dir: str | Path, part: str) -> Path:
    """The file holding ``part``: safetensors if present, else the legacy ``.pt`` name."""
    model_dir = Path(model_dir)
    new = model_dir / f"{part}.safetensors"
    if new.is_file():
        return new
    legacy = model_dir / _LEGACY.get(part, "pytorch_" + part.removeprefix("layer_") + ".pt")
    if legacy.is_file():
        return legacy
    raise FileNotFoundError(
        f"missing shard {new} (nor legacy {legacy.name}); re-run convert/from_hf.py or check --model-name"
    )


def part_exists(model_dir: str | Path, part: str) -> bool:
    return (Path(model_dir) / f"{part}.safetensors").is_file()


def load_part(model_dir: str | Path, part: str) -> dict[str, torch.Tensor]:
    """Tensors of one part. Legacy pickles load with ``weights_only=True``: no code runs."""
    path = part_file(model_dir, part)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_part(model_dir: str | Path, part: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one part as safetensors, via a temporary file so a crash never leaves half a file."""
    path = Path(model_dir) / f"{part}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    except SafetensorError as err:  # its I/O errors (a full disk) are no OSError: make them one, naming the file
        code = re.search(r"os error (\d+)", str(err))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(path)) from err
    os.replace(tmp, path)
    return path


def layer_indices(model_dir: str | Path) -> list[int]:
    """Global layer indices present in a sharded directory, sorted."""
    found = set()
    for entry in os.listdir(model_dir):
        match = _LAYER_FILE.fullmatch(entry)
        if match:
            found.add(int(match.group(1) or match.group(2)))
    return sorted(found)


def copy_model_files(src: str | Path, dst: str | Path, config: bool = True) -> list[Path]:
    """Copy config.json (unless ``config`` is false) and tokenizer files, whichever exist,
    from ``src`` to ``dst``."""
    copied = []
    for name in (*(("config.json", "generation_config.json") if config else ()), *TOKENIZER_FILES):
        if (Path(src) / name).is_file():
            copied.append(Path(shutil.copyfile(Path(src) / name, Path(dst) / name)))
    return copied


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"checkpoint_{step}"


def latest_step(root: str | Path) -> int | None:
    """The step named by ``<root>/latest``, or None when there is no checkpoint yet."""
    path = Path(root) / "latest"
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path} should hold a step number, not {text[:40]!r}; fix or remove it")
    return int(text)


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory from a sharded dir, a ``checkpoint_<step>`` dir or a checkpoint root."""
    path = Path(path)
    step = latest_step(path)
    if step is not None:
        path = checkpoint_dir(path, step)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a layer-sharded model or checkpoint")
    return path
