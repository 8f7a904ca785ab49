"""Preference pairs as sequences: each pair (data.sources.Pair) becomes two, chosen then rejected.

Each sequence is its prompt followed by its response (text: the response and an EOS; turns: the
chat template's rendering, the response's assistant tokens scored), padded; only response tokens
are scored. A text pair's prompt starts with the special tokens the tokenizer puts before a text
(Llama 3's BOS), as ``tokenizer(prompt)`` gives them. A pair longer than ``--seq-length`` is cut
as ``--truncation-mode`` says (``TRUNCATION``): ``keep_end`` (the default) drops the start of its
prompt until the longer sequence fits, keeping at least the prompt's last half of the sequence
length, and then cuts a response still too long at its end; ``keep_start`` (TRL's default) keeps
the start of each sequence, cutting responses at their end, and drops a pair whose prompt alone
fills the length (counted as ``truncated`` and ``dropped`` in the data state, logged once per
task). The stream (data.stream) draws pairs whole, so every micro-batch holds whole pairs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from data.chat import ChatTemplate
from data.sources import Conversation, Pair, Source

log = logging.getLogger(__name__)
READ_CHUNK = 64  # pairs tokenised together
TRUNCATION = ("keep_end", "keep_start")  # --truncation-mode: which end of a pair too long is kept
Row = tuple[list[int], list[int], list[int]]  # tokens, targets (1: scored), position ids


@dataclass(frozen=True)
class EncodedPair:
    line: int  # the record's line in its file
    chosen: Row
    rejected: Row


class PairPacker:
    """One task's pairs in file order, each as two padded sequences (the module docstring)."""

    def __init__(
        self, source: Source, tokenizer: object, eos_id: int, pad_id: int, chat: ChatTemplate,
        prefix: tuple[int, ...] = (), truncation: str = "keep_end",
    ) -> None:  # fmt: skip
        """``prefix``: the special tokens the tokenizer puts before a text (data.stream.special_prefix)."""
        if truncation not in TRUNCATION:
            raise ValueError(f"--truncation-mode {truncation!r}: choose one of {', '.join(TRUNCATION)}")
        self.source, self.tokenizer, self.chat = source, tokenizer, chat
        self.eos_id, self.pad_id = eos_id, pad_id
        self.prefix, self.truncation = list(prefix), truncation
        self.pending: list[EncodedPair] = []  # read, not yet drawn
        self.truncated = 0  # pairs whose prompt or responses were cut to the sequence length
        self.dropped = 0  # keep_start: pairs whose prompt alone filled the sequence length

    def next_pair(self, length: int) -> EncodedPair:
        epoch = self.source.epoch
        while not self.pending:
            self.pending = [p for p in (self._encoded(pair, length) for pair in self.source.read(READ_CHUNK)) if p]
            if not self.pending and self.source.epoch > epoch + 1:
                raise ValueError(
                    f"{self.source.path}: no pair of a whole pass over the file could be used (each was skipped, or "
                    f"its prompt alone fills --seq-length {length}); raise --seq-length or fix the records"
                )
        return self.pending.pop(0)

    def _encoded(self, pair: Pair, length: int) -> EncodedPair | None:
        try:
            prompt, responses = self._split(pair)
        except ValueError as err:  # a conversation the template cannot render
            if not self.source.skip_bad_lines:
                raise ValueError(f"{err}; fix the record or pass --skip-bad-lines") from None
            self.source.skipped(err)
            return None
        prefix = [] if pair.conversational else self.prefix  # a chat template renders its own
        if self.truncation == "keep_start" and len(prefix) + max(map(len, prompt)) >= length:
            self._dropping(pair, len(prefix) + max(map(len, prompt)), length)
            return None  # nothing of a response would be left to score
        longest = len(prefix) + max(len(p) + len(r) for p, (r, _) in zip(prompt, responses, strict=True))
        if longest > length:
            self._truncating(pair, longest, length)
        # keep_end: both prompts keep the same tokens, as many as the longer response leaves room for
        response_room = length - len(prefix) - max(len(r) for r, _ in responses)
        rows = [self._row(prefix, p, r, t, length, response_room) for p, (r, t) in zip(prompt, responses, strict=True)]
        return EncodedPair(pair.line, *rows)

    def _split(self, pair: Pair) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
        """Each sequence's prompt tokens and its response's (tokens, scored flags)."""
        if not pair.conversational:
            prompt, chosen, rejected = self.tokenizer(
                [pair.prompt, pair.chosen, pair.rejected], add_special_tokens=False
            )["input_ids"]  # fmt: skip
            responses = [([*r, self.eos_id], [1] * (len(r) + 1)) for r in (chosen, rejected)]
            return [prompt, prompt], responses
        prompts, responses = [], []
        for response in (pair.chosen, pair.rejected):
            conversation = Conversation(pair.prompt + response, pair.where)
            tokens, targets = self.chat.encode(conversation, trained_from=len(pair.prompt))
            start = targets.index(1)  # the response begins with its first scored token
            prompts.append(tokens[:start])
            responses.append((tokens[start:], targets[start:]))
        return prompts, responses

    def _row(
        self, prefix: list[int], prompt: list[int], response: list[int], scored: list[int], length: int, room: int
    ) -> Row:
        if self.truncation == "keep_end":
            keep = max(room, min(len(prompt), length // 2))
            prompt = prompt[len(prompt) - keep :] if keep < len(prompt) else prompt
        prompt = prefix + prompt  # the prefix survives a cut prompt
        tokens = (prompt + response)[:length]  # keep_start: each sequence's first tokens
        targets = ([0] * len(prompt) + scored)[:length]
        targets[0] = 0  # the first token has nothing before it
        pad = length - len(tokens)  # padding: its own block of positions, never scored
        return tokens + [self.pad_id] * pad, targets + [0] * pad, [*range(len(tokens)), *range(pad)]

    def _truncating(self, pair: Pair, size: int, length: int) -> None:
        if self.truncated == 0 and self.truncation == "keep_end":
            log.warning(
                "%s: a pair of %d tokens is longer than --seq-length %d; such pairs lose the start of their prompt "
                "(keeping at least its last %d tokens) and then the end of their responses until they fit "
                "(counted in the data state, logged once per task; --truncation-mode keep_start cuts as TRL does)",
                pair.where, size, length, length // 2,
            )  # fmt: skip
        elif self.truncated == 0:
            log.warning(
                "%s: a pair of %d tokens is longer than --seq-length %d; under --truncation-mode keep_start such "
                "sequences keep their first %d tokens, their responses cut at the end (counted in the data state, "
                "logged once per task)",
                pair.where, size, length, length,
            )  # fmt: skip
        self.truncated += 1

    def _dropping(self, pair: Pair, size: int, length: int) -> None:
        if self.dropped == 0:
            log.warning(
                "%s: a pair whose prompt alone has %d tokens, not less than --seq-length %d, is dropped under "
                "--truncation-mode keep_start, as TRL drops it (counted in the data state, logged once per task)",
                pair.where, size, length,
            )  # fmt: skip
        self.dropped += 1

    def state_dict(self) -> dict:
        pending = [[p.line, [list(x) for x in p.chosen], [list(x) for x in p.rejected]] for p in self.pending]
        state = {"source": self.source.state_dict(), "pending": pending, "truncated": self.truncated}
        return state | ({"dropped": self.dropped} if self.dropped else {})

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.pending = [EncodedPair(line, tuple(c), tuple(r)) for line, c, r in state["pending"]]
        self.truncated = state.get("truncated", 0)
        self.dropped = state.get("dropped", 0)


def all_pairs(packer: PairPacker, length: int) -> list[EncodedPair]:
    """Every pair of a fresh packer's file, once, in file order (lines only grow within a pass)."""
    pairs = [packer.next_pair(length)]
    while (pair := packer.next_pair(length)).line > pairs[-1].line:
        pairs.append(pair)
    return pairs


def data_hash(path: Path) -> str:
    """A short hash of a data file's bytes (a datasets folder: of its files, by name)."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()[:16]
