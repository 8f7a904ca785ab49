"""One global stream of packed token sequences, drawn from a weighted mix of tasks.

The stream depends only on the tasks, the tokenizer, ``--seq-length`` and ``--seed``; the
topology only decides who computes which slice of it. Its position is part of every checkpoint.

Each sequence comes from one task, picked by normalised weight; a task packs its examples
back to back with EOS after each, and starts over from its first record when it runs out:

    tokens   [ prompt ... | completion ... EOS | text ............ EOS | prompt ...
    targets  [ 0 0 0 0 0  | 1 1 1 1 1 1 1  1  | 1 1 1 1 1 1 1 1 1   1  | 0 0 0 ...

A conversation is its chat template's rendering, the assistant's turns trained (trainer.chat):

    tokens   [ <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n | Hello!<|im_end|> | \n ...
    targets  [ 0 ...                                                  | 1 ...            | 0 ...
"""

from __future__ import annotations

import copy
import math
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.chat import ChatTemplate
from trainer.sources import Conversation, Example, Source, source_kind

READ_CHUNK = 64  # examples tokenised together: the fast tokenizer works best in batches
IGNORE_INDEX = -100  # label of a token that is not trained on


@dataclass(frozen=True)
class TaskSpec:
    path: Path
    weight: float


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (n, seq)
    labels: torch.Tensor  # (n, seq): the token where it is trained on, else IGNORE_INDEX
    tasks: tuple[int, ...]  # index of the task each sequence came from

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
    """Packs one task's examples into fixed-length sequences: text and prompt/completion
    examples with EOS after each, conversations as their chat template renders them (which
    closes every turn with its own end-of-turn token)."""

    def __init__(self, source: Source, tokenizer: object, eos_id: int, chat: ChatTemplate) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.chat = chat
        self.tokens: list[int] = []
        self.targets: list[int] = []  # 1 where the token is trained on

    def _refill(self) -> None:
        examples = self.source.read(READ_CHUNK)
        plain = [e for e in examples if isinstance(e, Example)]
        encode = self.tokenizer
        prompts = iter(encode([e.prompt for e in plain], add_special_tokens=False)["input_ids"]) if plain else None
        completions = (
            iter(encode([e.completion for e in plain], add_special_tokens=False)["input_ids"]) if plain else None
        )
        for example in examples:  # in file order
            if isinstance(example, Conversation):
                tokens, targets = self.chat.encode(example)
                self.tokens += tokens
                self.targets += targets
            else:
                prompt, completion = next(prompts), next(completions)
                self.tokens += prompt + completion + [self.eos_id]
                self.targets += [0] * len(prompt) + [1] * (len(completion) + 1)

    def _encoded(self, texts: list[str]) -> Iterator[list[int]]:
        return iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])

    def next_sequence(self, length: int) -> tuple[list[int], list[int]]:
        while len(self.tokens) < length:
            self._refill()
        tokens, targets = self.tokens[:length], self.targets[:length]
        del self.tokens[:length], self.targets[:length]
        return tokens, targets

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "tokens": list(self.tokens), "targets": list(self.targets)}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.tokens, self.targets = list(state["tokens"]), list(state["targets"])


class TokenStream:
    """The global stream of sequences: ``next_batch(n)`` draws the next ``n``."""

    def __init__(
        self, tasks: tuple[TaskSpec, ...], tokenizer: object, seq_length: int, seed: int, skip_bad_lines: bool = False,
        chat_template: str | None = None,
    ) -> None:  # fmt: skip
        """``chat_template``: the Jinja text conversations are rendered with (default: the tokenizer's)."""
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise ValueError("the tokenizer has no EOS token; packing needs one between examples")
        self.tasks = tasks
        self.seq_length = seq_length
        self.rng = random.Random(seed)
        chat = ChatTemplate(tokenizer, chat_template)
        self.packers = [TaskPacker(Source(t.path, skip_bad_lines), tokenizer, eos_id, chat) for t in tasks]
        self.weights = [t.weight for t in tasks]

    def next_batch(self, count: int) -> Batch:
        rows, masks, picked = [], [], []
        for _ in range(count):
            (task,) = self.rng.choices(range(len(self.packers)), weights=self.weights)
            tokens, targets = self.packers[task].next_sequence(self.seq_length)
            rows.append(tokens)
            masks.append(targets)
            picked.append(task)
        input_ids = torch.tensor(rows, dtype=torch.long)  # (count, seq)
        labels = input_ids.masked_fill(torch.tensor(masks, dtype=torch.long) == 0, IGNORE_INDEX)
        return Batch(input_ids, labels, tuple(picked))

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


class Prefetcher:
    """Draws the next steps' batches on a background thread while the pipeline computes.

    Each batch comes with the stream's state right after it, so a checkpoint records the
    position of what was trained on, not of what was merely prefetched. (Tokenizers release
    the GIL, so the thread really overlaps with the step.)
    """

    def __init__(self, stream: TokenStream, per_step: int, depth: int = 2, pin_memory: bool = False) -> None:
        self._stream = stream
        self._per_step = per_step
        self._pin = pin_memory  # for a CUDA device: page-locked batches copy to it asynchronously
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="data-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._stream.next_batch(self._per_step)
                if self._pin:
                    batch = Batch(batch.input_ids.pin_memory(), batch.labels.pin_memory(), batch.tasks)
                item = (batch, copy.deepcopy(self._stream.state_dict()))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as err:  # noqa: BLE001 - handed to the training thread, which raises it
            self._queue.put(err)

    def next(self) -> tuple[Batch, dict]:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
