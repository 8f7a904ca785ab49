"""One global stream of token sequences, drawn from a weighted mix of tasks.

The stream depends only on the tasks, the tokenizer, ``--seq-length``, ``--seed`` and
``--packing``; the topology only decides who computes which slice of it. Its position is part of
every checkpoint.

Each sequence comes from one task, picked by normalised weight; a task reads its examples in
file order and starts over from its first record when it runs out. A text or prompt/completion
example ends with EOS; a conversation is its chat template's rendering (data.chat). How
examples become sequences (``--packing``):

- ``documents`` (default): whole examples back to back, each attending only to itself with its
  position ids restarting at 0 (so its loss and gradients are those of the example run alone;
  its first token, which has nothing before it, is not trained); an example that does not fit
  in what is left starts the next sequence, and the rest is padding (its own block, untrained):

    tokens     [ prompt .. completion .. EOS | text ....... EOS | pad pad ]
    positions  [ 0 1 2 ...                   | 0 1 2 ...       | 0 1     ]
    targets    [ 0 0 0 .. 1 1 1 1 1 1 1  1   | 0 1 1 1 1 1  1  | 0 0     ]

- ``concat``: the tokens of every example back to back, cut every ``--seq-length`` tokens
  wherever that falls; attention and positions run on across examples (the stream of the
  trainers this one descends from, and of runs checkpointed before ``--packing`` existed);
- ``none``: one example a sequence, padded.

An example longer than ``--seq-length`` is cut to its first ``--seq-length`` tokens under
``documents`` and ``none`` (logged once per task, counted in the data state).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from data.chat import ChatTemplate
from data.pairs import PairPacker
from data.sources import Conversation, Example, Source, source_kind

PACKING = ("documents", "concat", "none")
READ_CHUNK = 64  # examples tokenised together: the fast tokenizer works best in batches
IGNORE_INDEX = -100  # label of a token that is not trained on
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    path: Path
    weight: float


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (n, seq)
    labels: torch.Tensor  # (n, seq): the token where it is trained on, else IGNORE_INDEX
    tasks: tuple[int, ...]  # index of the task each sequence came from
    position_ids: torch.Tensor | None = None  # (n, seq): restarting at 0 with each example (None: 0..seq-1)
    records: tuple[int, ...] | None = None  # preference pairs: each sequence's record line in its task's file

    def positions(self) -> torch.Tensor:
        if self.position_ids is not None:
            return self.position_ids
        return torch.arange(self.input_ids.shape[1]).expand_as(self.input_ids)

    def lengths(self, row: int) -> list[int]:
        """The lengths of the blocks of sequence ``row`` (examples, and padding), from its positions."""
        starts = [*(self.positions()[row] == 0).nonzero().flatten().tolist(), self.input_ids.shape[1]]
        return [b - a for a, b in itertools.pairwise(starts)]

    def loss_tokens(self) -> int:
        """Tokens the loss counts: every trained token that has a token before it."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def parse_task_names(spec: str) -> tuple[TaskSpec, ...]:
    """``a.jsonl:0.2,b.jsonl.zst:0.8`` -> tasks with normalised weights (default weight 1)."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("--task-name is empty; give path[:weight],... of jsonl, jsonl.zst, csv or parquet files")
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
        if not path.exists():
            raise FileNotFoundError(f"--task-name {path}: no such file")
        kind = source_kind(path)  # raises on an unsupported type
        if kind != "dataset" and path.stat().st_size == 0:
            raise ValueError(f"--task-name {path}: the file is empty")
        raw.append((path, weight))
    total = sum(w for _, w in raw)
    if total <= 0:
        raise ValueError("--task-name weights are all zero; give at least one task a positive weight")
    return tuple(TaskSpec(path, w / total) for path, w in raw)


class TaskPacker:
    """Cuts one task's examples into sequences of ``length`` tokens, as ``packing`` says (module
    docstring): text and prompt/completion examples end with EOS, conversations as their chat
    template closes them. Returns each sequence's tokens, targets and position ids."""

    def __init__(
        self, source: Source, tokenizer: object, eos_id: int, pad_id: int, chat: ChatTemplate, packing: str,
        prefix: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        """``prefix``: the special tokens the tokenizer puts before a text (``special_prefix``)."""
        self.source = source
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = eos_id, pad_id
        self.prefix = list(prefix)
        self.chat = chat
        self.packing = packing
        self.tokens: list[int] = []  # concat: tokens read but not yet cut into sequences
        self.targets: list[int] = []  # 1 where the token is trained on
        self.pending: list[tuple[list[int], list[int]]] = []  # documents/none: whole examples not yet placed
        self.truncated = 0  # examples cut to the sequence length

    def _examples(self) -> list[tuple[list[int], list[int]]]:
        """The next examples of the file as (tokens, targets), in file order."""
        examples = self.source.read(READ_CHUNK)
        plain = [e for e in examples if isinstance(e, Example)]  # tokenised together, the fast way
        prompts, completions = self._encoded([e.prompt for e in plain]), self._encoded([e.completion for e in plain])
        encoded = []
        for example in examples:
            if isinstance(example, Conversation):
                try:
                    encoded.append(self.chat.encode(example))
                except ValueError as err:  # one conversation the template cannot render or split
                    if self.chat.template is None:
                        raise
                    if not self.source.skip_bad_lines:
                        raise ValueError(f"{err}; fix the record or pass --skip-bad-lines") from None
                    self.source.skipped(err)
            else:
                prompt, completion = self.prefix + next(prompts), next(completions)
                encoded.append((prompt + completion + [self.eos_id], [0] * len(prompt) + [1] * (len(completion) + 1)))
        return encoded

    def _next_examples(self) -> list[tuple[list[int], list[int]]]:
        """``_examples``, never empty: under --skip-bad-lines a whole chunk may be skipped, but not
        a whole pass over the file."""
        epoch = self.source.epoch
        while not (examples := self._examples()):
            if self.source.epoch > epoch + 1:
                raise ValueError(
                    f"{self.source.path}: no example of a whole pass over the file could be used (every "
                    "conversation was skipped); fix the records or the chat template"
                )
        return examples

    def _encoded(self, texts: list[str]) -> Iterator[list[int]]:
        return iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])

    def next_sequence(self, length: int) -> tuple[list[int], list[int], list[int]]:
        if self.packing == "concat":
            while len(self.tokens) < length:
                for tokens, targets in self._next_examples():
                    self.tokens += tokens
                    self.targets += targets
            tokens, targets = self.tokens[:length], self.targets[:length]
            del self.tokens[:length], self.targets[:length]
            return tokens, targets, list(range(length))
        tokens, targets, positions = [], [], []
        while True:
            if not self.pending:
                self.pending = self._next_examples()
            size = min(len(self.pending[0][0]), length)
            if tokens and len(tokens) + size > length:
                break  # it starts the next sequence
            example, trained = self.pending.pop(0)
            if len(example) > length:
                self._truncating(len(example), length)
            tokens += example[:size]
            targets += [0, *trained[1:size]]  # its first token has nothing before it in the example
            positions += range(size)
            if self.packing == "none" or len(tokens) == length:
                break
        pad = length - len(tokens)  # padding: its own block of positions, never trained
        return tokens + [self.pad_id] * pad, targets + [0] * pad, positions + list(range(pad))

    def _truncating(self, size: int, length: int) -> None:
        if self.truncated == 0:
            log.warning(
                "%s: an example of %d tokens is longer than --seq-length %d; such examples are cut to their "
                "first %d tokens (the rest is not trained; counted in the data state, logged once per task); "
                "--packing concat trains on every token of long documents",
                self.source.path, size, length, length,
            )  # fmt: skip
        self.truncated += 1

    def state_dict(self) -> dict:
        return {
            "source": self.source.state_dict(),
            "tokens": list(self.tokens),
            "targets": list(self.targets),
            "pending": [[list(t), list(m)] for t, m in self.pending],
            "truncated": self.truncated,
        }

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.tokens, self.targets = list(state["tokens"]), list(state["targets"])
        self.pending = [(list(t), list(m)) for t, m in state.get("pending", [])]
        self.truncated = state.get("truncated", 0)


def special_prefix(tokenizer: object) -> tuple[int, ...]:
    """The special tokens HF's tokenizer call puts before a text: Llama 3's BOS, Gemma's; none for
    GPT-2, GPT-NeoX, Qwen or SmolLM2. A plain text, a prompt and a preference pair's prompt start
    with them, as ``tokenizer(text)`` (and so TRL) gives them; a conversation's come from its chat
    template. Tokens a tokenizer appends after a text are not added: each example ends with EOS."""
    probe = "a"
    whole = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(whole) - len(bare) + 1):
        if whole[start : start + len(bare)] == bare:
            return tuple(whole[:start])
    return ()


def pair_batch(rows: list, tasks: list[int], lines: list[int]) -> Batch:
    """A batch of preference sequences (data.pairs's rows: tokens, targets, positions)."""
    input_ids = torch.tensor([tokens for tokens, _, _ in rows], dtype=torch.long)
    scored = torch.tensor([targets for _, targets, _ in rows], dtype=torch.long)
    positions = torch.tensor([places for _, _, places in rows], dtype=torch.long)
    return Batch(input_ids, input_ids.masked_fill(scored == 0, IGNORE_INDEX), tuple(tasks), positions, tuple(lines))


def resumed_packing(requested: str | None, data_state: dict) -> str:
    """The packing a resumed stream goes on with: the one its checkpoint recorded (a checkpoint
    from before --packing existed packed ``concat``); an explicit ``requested`` must agree."""
    recorded = data_state.get("packing", "concat")
    if requested is not None and requested != recorded:
        raise ValueError(
            f"--packing {requested}, but the checkpoint's data stream was packed {recorded}; resume with "
            f"--packing {recorded} (or leave the flag out), or start a new run in another --checkpoint-path"
        )
    return recorded


class TokenStream:
    """The global stream of sequences: ``next_batch(n)`` draws the next ``n``."""

    def __init__(
        self, tasks: tuple[TaskSpec, ...], tokenizer: object, seq_length: int, seed: int, skip_bad_lines: bool = False,
        chat_template: str | None = None, packing: str | None = None, pairs: bool = False,
        truncation: str = "keep_end",
    ) -> None:  # fmt: skip
        """``chat_template``: the Jinja text conversations are rendered with (default: the
        tokenizer's). ``packing``: one of PACKING; None is ``documents`` for a new stream and the
        recorded one for a resumed stream (``resumed_packing``). ``pairs``: the tasks hold
        preference pairs, each drawn as two sequences (data.pairs), and packing is none;
        ``truncation`` says how a pair too long is cut (data.pairs.TRUNCATION)."""
        if packing is not None and packing not in PACKING:
            raise ValueError(f"--packing {packing!r}: choose one of {', '.join(PACKING)}")
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise ValueError("the tokenizer has no EOS token; packing needs one between examples")
        pad_id = getattr(tokenizer, "pad_token_id", None)
        # what sequences are padded with (a reward model pools before it): the pad token, else EOS
        self.tokenizer, self.eos_id, self.skip_bad_lines = tokenizer, eos_id, skip_bad_lines
        self.pad_id = eos_id if pad_id is None else pad_id
        self.tasks = tasks
        self.seq_length = seq_length
        self.requested, self.packing = packing, packing or "documents"
        self.rng = random.Random(seed)
        chat = ChatTemplate(tokenizer, chat_template)
        self.chat, self.chat_template = chat, chat.fingerprint()
        self.pairs, self.truncation = pairs, truncation
        self.prefix = special_prefix(tokenizer)
        if pairs:
            self.packers = [self.pair_packer(t) for t in tasks]
        else:
            self.packers = [TaskPacker(Source(t.path, skip_bad_lines), tokenizer, eos_id, self.pad_id, chat,
                                       self.packing, self.prefix) for t in tasks]  # fmt: skip
        self.weights = [t.weight for t in tasks]

    def pair_packer(self, task: TaskSpec) -> PairPacker:
        """A fresh reader of ``task``'s preference pairs, cut as this stream cuts them."""
        source = Source(task.path, self.skip_bad_lines, pairs=True)
        return PairPacker(source, self.tokenizer, self.eos_id, self.pad_id, self.chat, self.prefix, self.truncation)

    def next_batch(self, count: int) -> Batch:
        if self.pairs:
            return self._next_pairs(count)
        rows, masks, positions, picked = [], [], [], []
        for _ in range(count):
            (task,) = self.rng.choices(range(len(self.packers)), weights=self.weights)
            tokens, targets, places = self.packers[task].next_sequence(self.seq_length)
            rows.append(tokens)
            masks.append(targets)
            positions.append(places)
            picked.append(task)
        input_ids = torch.tensor(rows, dtype=torch.long)  # (count, seq)
        labels = input_ids.masked_fill(torch.tensor(masks, dtype=torch.long) == 0, IGNORE_INDEX)
        return Batch(input_ids, labels, tuple(picked), torch.tensor(positions, dtype=torch.long))

    def _next_pairs(self, count: int) -> Batch:
        """``count // 2`` pairs, each as its chosen and its rejected sequence, in that order."""
        rows, picked, lines = [], [], []
        for _ in range(count // 2):
            (task,) = self.rng.choices(range(len(self.packers)), weights=self.weights)
            pair = self.packers[task].next_pair(self.seq_length)
            rows += [pair.chosen, pair.rejected]
            picked += [task, task]
            lines += [pair.line, pair.line]
        return pair_batch(rows, picked, lines)

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "packing": self.packing,
            **({"truncation": self.truncation} if self.pairs else {}),
            # the template that rendered conversations into this stream (None: none rendered yet)
            "chat_template": self.chat_template if self.chat.used else None,
            "tasks": {str(t.path): p.state_dict() for t, p in zip(self.tasks, self.packers, strict=True)},
        }

    def load_state_dict(self, state: dict) -> None:
        packing = resumed_packing(self.requested, state)
        recorded = state.get("chat_template")
        if recorded is not None and recorded != self.chat_template:
            raise ValueError(
                "the checkpoint's data stream rendered conversations with another chat template; resume with "
                "the --chat-template (and tokenizer) it used, or start a new run in another --checkpoint-path"
            )
        recorded_cut = state.get("truncation", "keep_end")
        if self.pairs and recorded_cut != self.truncation:
            raise ValueError(
                f"--truncation-mode {self.truncation}, but the checkpoint's pairs were cut {recorded_cut}; resume with "
                f"--truncation-mode {recorded_cut}, or start a new run in another --checkpoint-path"
            )
        if "packing" not in state:
            log.warning("the checkpoint's data stream predates --packing: it goes on packed as it was, concat")
        self.packing = packing
        self.chat.used = recorded is not None
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for task, packer in zip(self.tasks, self.packers, strict=True):
            if str(task.path) not in state["tasks"]:
                raise ValueError(
                    f"the checkpoint's data state has no task {task.path}; resume with the same --task-name"
                )
            packer.load_state_dict(state["tasks"][str(task.path)])
            packer.packing = packing
