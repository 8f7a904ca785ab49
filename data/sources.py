"""Reading training examples from files: jsonl, jsonl.zst, csv, parquet and ``datasets`` folders.

A source yields examples in file order, forever (it starts over at the end: a new epoch), and
its position is a record count, so a resumed run re-opens the file and skips exactly that many
records. Each record is plain text (every token trained), a prompt with a completion (only
the completion and its EOS trained), or a conversation (``Conversation``: OpenAI/TRL
``messages``, ShareGPT ``conversations``, alpaca ``instruction``/``input``/``output``), which
``data.chat`` renders through the chat template, training the assistant's turns.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
COMPLETION_FIELDS = ("completion", "generation", "response")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speakers (and LLaMA-Factory's tool-calling ones) as chat roles
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}  # fmt: skip
EXPECTED = (
    "'text'; 'prompt' with one of " + "/".join(f"'{f}'" for f in COMPLETION_FIELDS) + "; 'messages' "
    "(role/content turns); 'conversations' (ShareGPT from/value turns); or 'instruction' with 'output' (alpaca)"
)
MAX_REPORTED_BAD_LINES = 10
PAIR_PARTS = ("prompt", "chosen", "rejected")
PAIR_EXPECTED = (
    "'chosen' and 'rejected' (strings, or lists of role/content turns) with an optional 'prompt' (without one, "
    "the part the two share is the prompt, as in Anthropic HH)"
)


@dataclass(frozen=True)
class Example:
    prompt: str  # context only: not trained on ("" for plain text)
    completion: str  # trained on


@dataclass(frozen=True)
class Conversation:
    """Chat turns, rendered by the tokenizer's chat template (data.chat); the assistant's
    turns are trained on, the others are context."""

    messages: tuple[tuple[str, str], ...]  # (role, content), role one of ROLES
    where: str = field(default="", compare=False)  # file:line, for errors found when rendering


@dataclass(frozen=True)
class Pair:
    """A preference pair: one prompt and two responses to it, the first preferred. Each part
    is text, or (role, content) turns rendered by the chat template (all three of one kind)."""

    prompt: str | tuple[tuple[str, str], ...]
    chosen: str | tuple[tuple[str, str], ...]
    rejected: str | tuple[tuple[str, str], ...]
    line: int = 0  # the record's line (row) in its file: with the file, the pair's name
    where: str = field(default="", compare=False)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.chosen, str)


def pair_from_record(record: object, where: str, line: int) -> Pair:
    """The preference pair a decoded record holds (TRL's preference formats), or a one-line
    error naming ``where`` and what is wrong."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        found = f"fields {sorted(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise ValueError(f"{where}: expected a preference pair: {PAIR_EXPECTED}; found {found}")
    parts = [record.get("prompt"), record["chosen"], record["rejected"]]
    if all(isinstance(p, str) or p is None for p in parts):
        kind = "text"
    elif all(isinstance(p, list) or p is None for p in parts):
        kind = "turns"
        parts = [None if p is None else _turns(p, name, where) for p, name in zip(parts, PAIR_PARTS, strict=True)]
    else:
        raise ValueError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings or all lists of turns")
    prompt, chosen, rejected = parts
    if prompt is None:  # an implicit prompt: the beginning both responses share
        prompt, chosen, rejected = _shared_start(chosen, rejected)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise ValueError(f"{where}: the {name} response is empty; a pair needs two responses to compare")
        if kind == "turns" and not any(role == "assistant" for role, _ in response):
            raise ValueError(f"{where}: the {name} response has no assistant turn, so nothing of it would be scored")
    if chosen == rejected:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same response; the pair teaches no preference")
    return Pair(prompt, chosen, rejected, line, where)


def _turns(turns: list, name: str, where: str) -> tuple[tuple[str, str], ...]:
    if not turns:
        return ()
    try:
        return _conversation(turns, "role", "content", {r: r for r in ROLES}, where, need_assistant=False).messages
    except ValueError as err:  # name the part: "f:3: 'chosen' turn 1 has ..."
        raise ValueError(str(err).replace(f"{where}: ", f"{where}: '{name}' ", 1)) from None


def _shared_start(chosen: str | tuple, rejected: str | tuple) -> tuple:
    """(prompt, chosen, rejected) from two whole texts (or turn lists) that begin alike: the
    prompt is what they share; a space before the point where they part goes with the responses."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(chosen, str) and shared and chosen[shared - 1] == " ":
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def example_from_record(record: object, where: str) -> Example | Conversation:
    """The example a decoded record holds; a record of another shape names ``where`` and the fields expected."""
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return Example("", record["text"])
        if isinstance(record.get("prompt"), str):
            for name in COMPLETION_FIELDS:
                if isinstance(record.get(name), str):
                    return Example(record["prompt"], record[name])
        if record.get("messages") is not None:
            return _conversation(record["messages"], "role", "content", {r: r for r in ROLES}, where)
        if record.get("conversations") is not None:
            return _conversation(record["conversations"], "from", "value", SHAREGPT_ROLES, where)
        if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
            return _alpaca(record, where)
        found = f"fields {sorted(record)}"
    else:
        found = f"a JSON {type(record).__name__}"
    raise ValueError(f"{where}: expected {EXPECTED}; found {found}")


def _conversation(
    turns: object, role_key: str, content_key: str, roles: dict, where: str, need_assistant: bool = True
) -> Conversation:
    """Turns as (role, content) pairs, every one checked: a known role, string content, and at
    least one assistant turn (nothing else would be trained)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: empty conversation (expected a non-empty list of turns)")
    messages = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: turn {n} is a JSON {type(turn).__name__}, not an object")
        speaker, content = turn.get(role_key), turn.get(content_key)
        if speaker not in roles:
            raise ValueError(f"{where}: turn {n} has unknown {role_key} {speaker!r}; expected one of {sorted(roles)}")
        if not isinstance(content, str):
            raise ValueError(
                f"{where}: turn {n}'s {content_key} is a JSON {type(content).__name__}, not a string "
                "(multimodal content parts are not supported)"
            )
        messages.append((roles[speaker], content))
    if need_assistant and not any(role == "assistant" for role, _ in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing of it would be trained")
    return Conversation(tuple(messages), where)


def _alpaca(record: dict, where: str) -> Conversation:
    """An alpaca record as one exchange: the instruction (and its input, on the next line, as
    LLaMA-Factory joins them) from the user, the output from the assistant."""
    for name in ("input", "system"):
        if record.get(name) is not None and not isinstance(record[name], str):
            raise ValueError(f"{where}: '{name}' is a JSON {type(record[name]).__name__}, not a string")
    query = "\n".join(part for part in (record["instruction"], record.get("input")) if part)
    system = (("system", record["system"]),) if record.get("system") else ()
    return Conversation((*system, ("user", query), ("assistant", record["output"])), where)


def source_kind(path: Path) -> str:
    """``jsonl``, ``zst``, ``csv``, ``parquet`` or ``dataset``, or a ValueError naming what is supported."""
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
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .jsonl.zst, .csv, .parquet or a datasets folder")


class Source:
    """Examples of one task in order, cycling forever, resumable from a record count."""

    def __init__(self, path: Path, skip_bad_lines: bool = False, pairs: bool = False) -> None:
        """``pairs``: records are preference pairs (``pair_from_record``), not training examples."""
        self.path = path
        self.pairs = pairs
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
        if self.kind == "parquet":
            return self._parquet_rows()
        return self._lines()

    def _lines(self) -> Iterator[tuple[int, object]]:
        with open(self.path, "rb") as raw:
            stream = raw
            if self.kind == "zst":
                import zstandard

                stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
            yield from enumerate(stream, start=1)

    def _parquet_rows(self) -> Iterator[tuple[int, object]]:
        """Rows as records (a list column of structs, such as ``messages``, as a list of dicts),
        numbered from 1, read a row group's batch at a time."""
        import pyarrow.parquet as pq

        rows = (row for batch in pq.ParquetFile(self.path).iter_batches(batch_size=1024) for row in batch.to_pylist())
        yield from enumerate(rows, start=1)

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

    def read(self, count: int) -> list[Example | Conversation | Pair]:
        """The next ``count`` examples, starting a new epoch at the end of the file."""
        examples: list[Example | Conversation | Pair] = []
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

    def _decode(self, line_no: int, record: object) -> Example | Conversation | Pair | None:
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
            return pair_from_record(record, where, line_no) if self.pairs else example_from_record(record, where)
        except ValueError as err:
            if not self.skip_bad_lines:
                raise
            self.skipped(err)
            return None

    def skipped(self, err: ValueError) -> None:
        """Count a record skipped under --skip-bad-lines (the first few are logged)."""
        self.bad_lines += 1
        if self.bad_lines <= MAX_REPORTED_BAD_LINES:
            log.warning("skipped bad line (%d so far): %s", self.bad_lines, err)

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "bad_lines": self.bad_lines}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch = state["position"], state["epoch"]
        self.bad_lines = state.get("bad_lines", 0)
        self._records = None
