"""One global stream of packed token sequences, drawn from a weighted mix of jsonl tasks.

The stream depends only on the tasks, the tokenizer, ``--seq-length`` and ``--seed``; the
topology only decides who computes which slice of it. Its position is part of every checkpoint.

Each sequence comes from one task, picked by normalised weight; a task packs its documents
back to back with EOS after each, and starts over from its first line when it runs out.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

READ_CHUNK = 64  # documents tokenised together: the fast tokenizer works best in batches
SUPPORTED_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class TaskSpec:
    path: Path
    weight: float


def parse_task_names(spec: str) -> tuple[TaskSpec, ...]:
    """``a.jsonl:0.2,b.jsonl:0.8`` -> tasks with normalised weights (default weight 1)."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("--task-name is empty; give path[:weight],... of jsonl files with a 'text' field")
    raw: list[tuple[Path, float]] = []
    for entry in entries:
        path_text, weight = entry, 1.0
        head, sep, tail = entry.rpartition(":")
        if sep:
            try:
                weight = float(tail)
                path_text = head
            except ValueError:
                pass  # a ':' inside the path, not a weight
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--task-name weight {weight} for {path_text} must be a finite number >= 0")
        path = Path(path_text)
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(f"--task-name {path}: unsupported file type {path.suffix!r}; use {SUPPORTED_SUFFIXES}")
        if not path.is_file():
            raise FileNotFoundError(f"--task-name {path}: no such file")
        if path.stat().st_size == 0:
            raise ValueError(f"--task-name {path}: the file is empty")
        raw.append((path, weight))
    total = sum(w for _, w in raw)
    if total <= 0:
        raise ValueError("--task-name weights are all zero; give at least one task a positive weight")
    return tuple(TaskSpec(path, w / total) for path, w in raw)


class DocumentReader:
    """Texts of one jsonl file in order, forever, resumable from a byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.line_no = 0
        self.epoch = 0

    def read(self, count: int) -> list[str]:
        texts: list[str] = []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            whole_pass, docs_this_pass = self.offset == 0, 0
            while len(texts) < count:
                line = f.readline()
                if not line:  # end of file: start the next epoch
                    if whole_pass and docs_this_pass == 0:
                        raise ValueError(f"{self.path}: no documents (only blank lines)")
                    f.seek(0)
                    self.offset, self.line_no, self.epoch = 0, 0, self.epoch + 1
                    whole_pass, docs_this_pass = True, 0
                    continue
                self.offset += len(line)
                self.line_no += 1
                if line.strip():
                    texts.append(self._text(line))
                    docs_this_pass += 1
        return texts

    def _text(self, line: bytes) -> str:
        where = f"{self.path}:{self.line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}); fix or remove the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: expected an object with a string 'text' field, found {found}")
        return record["text"]

    def state_dict(self) -> dict:
        return {"offset": self.offset, "line_no": self.line_no, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.offset, self.line_no, self.epoch = state["offset"], state["line_no"], state["epoch"]


class TaskPacker:
    """Packs one task's documents into fixed-length sequences, EOS after every document."""

    def __init__(self, reader: DocumentReader, tokenizer: object, eos_id: int) -> None:
        self.reader = reader
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.buffer: list[int] = []

    def next_sequence(self, length: int) -> list[int]:
        while len(self.buffer) < length:
            texts = self.reader.read(READ_CHUNK)
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                self.buffer.extend(ids)
                self.buffer.append(self.eos_id)
        sequence, self.buffer = self.buffer[:length], self.buffer[length:]
        return sequence

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.buffer = list(state["buffer"])


class TokenStream:
    """The global stream of sequences: ``next_sequences(n)`` -> LongTensor (n, seq_length)."""

    def __init__(self, tasks: tuple[TaskSpec, ...], tokenizer: object, seq_length: int, seed: int) -> None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise ValueError("the tokenizer has no EOS token; packing needs one between documents")
        self.tasks = tasks
        self.seq_length = seq_length
        self.rng = random.Random(seed)
        self.packers = [TaskPacker(DocumentReader(t.path), tokenizer, eos_id) for t in tasks]
        self.weights = [t.weight for t in tasks]

    def next_sequences(self, count: int) -> torch.Tensor:
        rows = []
        for _ in range(count):
            (task,) = self.rng.choices(range(len(self.packers)), weights=self.weights)
            rows.append(self.packers[task].next_sequence(self.seq_length))
        return torch.tensor(rows, dtype=torch.long)  # (count, seq)

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "tasks": {str(t.path): p.state_dict() for t, p in zip(self.tasks, self.packers, strict=True)},
        }

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for task, packer in zip(self.tasks, self.packers, strict=True):
            if str(task.path) not in state["tasks"]:
                raise ValueError(
                    f"the checkpoint's data state has no task {task.path}; resume with the same --task-name"
                )
            packer.load_state_dict(state["tasks"][str(task.path)])
