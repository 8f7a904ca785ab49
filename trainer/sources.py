"""Reading training examples from files: jsonl, jsonl.zst, csv and ``datasets`` folders.

A source yields examples in file order, forever (it starts over at the end: a new epoch), and
its position is a record count, so a resumed run re-opens the file and skips exactly that many
records. Each record is either plain text (every token trained) or a prompt with a
completion (only the completion and its EOS trained).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
COMPLETION_FIELDS = ("completion", "generation", "response")
EXPECTED = "a 'text' field, or 'prompt' with one of " + "/".join(f"'{f}'" for f in COMPLETION_FIELDS)
MAX_REPORTED_BAD_LINES = 10


@dataclass(frozen=True)
class Example:
    prompt: str  # context only: not trained on ("" for plain text)
    completion: str  # trained on


def example_from_record(record: object, where: str) -> Example:
    """The example a decoded record holds; a record of another shape names ``where`` and the fields expected."""
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return Example("", record["text"])
        if isinstance(record.get("prompt"), str):
            for field in COMPLETION_FIELDS:
                if isinstance(record.get(field), str):
                    return Example(record["prompt"], record[field])
        found = f"fields {sorted(record)}"
    else:
        found = f"a JSON {type(record).__name__}"
    raise ValueError(f"{where}: expected {EXPECTED}; found {found}")


def source_kind(path: Path) -> str:
    """``jsonl``, ``zst``, ``csv`` or ``dataset``, or a ValueError naming what is supported."""
    name = path.name
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "dataset"
        raise ValueError(f"{path} is a folder but not one saved by datasets.save_to_disk")
    if name.endswith(".jsonl.zst"):
        return "zst"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .jsonl.zst, .csv or a datasets folder")


class Source:
    """Examples of one task in order, cycling forever, resumable from a record count."""

    def __init__(self, path: Path, skip_bad_lines: bool = False) -> None:
        self.path = path
        self.kind = source_kind(path)
        self.skip_bad_lines = skip_bad_lines
        self.position = 0  # records consumed in this epoch (blank lines included)
        self.epoch = 0
        self.bad_lines = 0
        self._records: Iterator[tuple[int, object]] | None = None

    # -- raw records: (1-based line or row number, decoded record or raw line) ----------------

    def _open(self) -> Iterator[tuple[int, object]]:
        if self.kind == "dataset":
            from datasets import load_from_disk

            data = load_from_disk(str(self.path))
            return ((i + 1, data[i]) for i in range(len(data)))
        if self.kind == "csv":
            return self._csv_rows()
        return self._lines()

    def _lines(self) -> Iterator[tuple[int, object]]:
        with open(self.path, "rb") as raw:
            stream = raw
            if self.kind == "zst":
                import zstandard

                stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
            yield from enumerate(stream, start=1)

    def _csv_rows(self) -> Iterator[tuple[int, object]]:
        with open(self.path, newline="", encoding="utf-8") as f:
            yield from enumerate(csv.DictReader(f), start=2)  # line 1 is the header

    def _next_record(self) -> tuple[int, object] | None:
        if self._records is None:
            self._records = self._open()
            for _ in range(self.position):  # resume: skip what was consumed, without decoding it
                next(self._records, None)
        item = next(self._records, None)
        if item is not None:
            self.position += 1
        return item

    # -- examples -----------------------------------------------------------------------------

    def read(self, count: int) -> list[Example]:
        """The next ``count`` examples, starting a new epoch at the end of the file."""
        examples: list[Example] = []
        whole_pass, found_in_pass = self.position == 0, 0
        while len(examples) < count:
            item = self._next_record()
            if item is None:  # end of the file: next epoch
                if whole_pass and found_in_pass == 0:
                    raise ValueError(f"{self.path}: no usable examples in the whole file")
                self._records, self.position, self.epoch = None, 0, self.epoch + 1
                whole_pass, found_in_pass = True, 0
                continue
            example = self._decode(*item)
            if example is not None:
                examples.append(example)
                found_in_pass += 1
        return examples

    def _decode(self, line_no: int, record: object) -> Example | None:
        where = f"{self.path}:{line_no}"
        try:
            if isinstance(record, bytes):
                if not record.strip():
                    return None  # blank line
                try:
                    record = json.loads(record)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{where}: not valid JSON ({err.msg}); fix the line or pass --skip-bad-lines"
                    ) from None
            return example_from_record(record, where)
        except ValueError as err:
            if not self.skip_bad_lines:
                raise
            self.bad_lines += 1
            if self.bad_lines <= MAX_REPORTED_BAD_LINES:
                log.warning("skipped bad line (%d so far): %s", self.bad_lines, err)
            return None

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "bad_lines": self.bad_lines}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch = state["position"], state["epoch"]
        self.bad_lines = state.get("bad_lines", 0)
        self._records = None
