"""Preference pairs and their losses: DPO (Rafailov et al. 2023), SimPO (Meng et al. 2024) and
reward models, over the pipeline.

A pair (trainer.sources.Pair) becomes two sequences, chosen then rejected, next to each other in
the batch, so every micro-batch holds whole pairs (``--batch-size`` and ``--micro-batch-size``
count pairs). Each sequence is its prompt followed by its response (text: the response and an
EOS; turns: the chat template's rendering, the response's assistant tokens scored), padded;
only response tokens are scored. A text pair's prompt starts with the special tokens the
tokenizer puts before a text (Llama 3's BOS), as ``tokenizer(prompt)`` gives them. A pair longer
than ``--seq-length`` is cut as ``--truncation-mode`` says (``TRUNCATION``): ``keep_end`` (the
default) drops the start of its prompt until the longer sequence fits, keeping at least the
prompt's last half of the sequence length, and then cuts a response still too long at its end;
``keep_start`` (TRL's default) keeps the start of each sequence, cutting responses at their end,
and drops a pair whose prompt alone fills the length (counted as ``truncated`` and ``dropped``
in the data state, logged once per task).

For DPO the last stage sums each sequence's log-probability over its response tokens (without
holding all logits: trainer.loss.sequence_logps) and forms TRL's loss,
``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` (with label smoothing, the
conservative form), and TRL's metrics; the reference log-probabilities ``ref`` come from
trainer.reference (precomputed once and kept in the checkpoint folder as ``ReferenceLogps``, by
file and record with each file's hash, or each step's forward of the starting weights). A reward
model scores each sequence at its last real token (``last_tokens``) with a scalar head.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.chat import ChatTemplate
from trainer.sources import Conversation, Pair, Source

log = logging.getLogger(__name__)
READ_CHUNK = 64  # pairs tokenised together
REFERENCE_FILE = "dpo_reference.json"
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
        """``prefix``: the special tokens the tokenizer puts before a text (trainer.data.special_prefix)."""
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


# -- the loss ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpoSettings:
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: the chance that a pair's label is flipped
    loss: str = "sigmoid"  # or "simpo": each response's mean log-prob, no reference, a target margin
    simpo_gamma: float = 0.5


class PairLoss:
    """The last stage's loss over pairs for one step (or evaluation): ``totals`` sums the
    step's metrics (``METRICS``, then the number of pairs) for the row."""

    METRICS: tuple[str, ...] = ()

    def __init__(self, device: torch.device | str) -> None:
        self.totals = torch.zeros(len(self.METRICS) + 1, dtype=torch.float32, device=device)

    def _add(self, stats: list[torch.Tensor]) -> None:
        """Add each statistic's sum over these pairs (no graph is kept), and the pairs."""
        with torch.no_grad():
            pairs = torch.tensor(float(len(stats[0])))
            self.totals += torch.stack([s.sum() for s in stats] + [pairs]).to(self.totals)

    def row(self, totals: list[float], prefix: str = "") -> dict[str, float]:
        """The metrics from summed ``totals`` (over micro-batches and replicas), means over pairs."""
        pairs = max(1.0, totals[-1])
        return {prefix + name: value / pairs for name, value in zip(self.METRICS, totals, strict=False)}


class DpoLoss(PairLoss):
    """DPO from each sequence's summed log-probability and the reference's; or SimPO (Meng et
    al. 2024) from each response's mean log-probability alone,
    ``-log sigmoid(beta * (mean_c - mean_r) - gamma)`` (label smoothing as DPO's)."""

    # TRL's names (rewards are beta times the log-ratio to the reference)
    METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")  # fmt: skip

    def __init__(self, settings: DpoSettings, device: torch.device | str) -> None:
        super().__init__(device)
        self.settings = settings

    def __call__(
        self, logps: torch.Tensor, reference: torch.Tensor | None, normalizer: float, scored: torch.Tensor
    ) -> torch.Tensor:
        """``logps``, ``reference``, ``scored`` (each sequence's scored tokens): (2 * pairs,),
        chosen and rejected alternating; returns the summed loss of these pairs over ``normalizer``.
        Under SimPO the rewards and log-probs reported are the length-normalised ones, as TRL's."""
        beta, smoothing = self.settings.beta, self.settings.label_smoothing
        simpo = self.settings.loss == "simpo"
        if simpo:
            logps = logps / scored
        chosen, rejected = logps[0::2], logps[1::2]
        if simpo:
            chosen_ratio, rejected_ratio = chosen, rejected
            margin = beta * (chosen - rejected) - self.settings.simpo_gamma
        else:
            chosen_ratio, rejected_ratio = chosen - reference[0::2], rejected - reference[1::2]
            margin = beta * (chosen_ratio - rejected_ratio)
        losses = -F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing
        rewards_c, rewards_r = beta * chosen_ratio, beta * rejected_ratio
        self._add([rewards_c, rewards_r, (rewards_c > rewards_r).float(), rewards_c - rewards_r, chosen, rejected])
        return losses.sum() / normalizer


class RewardLoss(PairLoss):
    """A reward model's pairwise loss, ``-log sigmoid(r_chosen - r_rejected)`` (ColossalAI's
    ``log(1 + exp(r_rejected - r_chosen))`` is the same function)."""

    METRICS = ("accuracy", "margin", "mean_reward")  # TRL's RewardTrainer's names

    def __call__(self, rewards: torch.Tensor, normalizer: float) -> torch.Tensor:
        """``rewards``: (2 * pairs,) chosen and rejected alternating."""
        chosen, rejected = rewards[0::2], rewards[1::2]
        losses = -F.logsigmoid(chosen - rejected)
        self._add([(chosen > rejected).float(), chosen - rejected, (chosen + rejected) / 2])
        return losses.sum() / normalizer


def last_tokens(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Where HF's sequence classifiers pool each row: its rightmost token that is not ``pad_id``."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


# -- the reference ------------------------------------------------------------------------------


class ReferenceLogps:
    """The reference model's summed log-probabilities of every pair's chosen and rejected
    sequences, by data file (training tasks, then evaluation tasks) and record line."""

    def __init__(self, files: list[dict]) -> None:
        self.files = files  # {"name", "hash", "lines": [...], "logps": [[chosen, rejected], ...]}
        self._index = [{line: k for k, line in enumerate(f["lines"])} for f in files]

    def rows(self, keys: list[tuple[int, int]]) -> torch.Tensor:
        """(2 * len(keys),) reference log-probs of the pairs ``keys`` ((file, line) each), chosen
        and rejected alternating."""
        values = [v for file, line in keys for v in self.files[file]["logps"][self._index[file][line]]]
        return torch.tensor(values, dtype=torch.float32)

    def save(self, path: Path, identity: dict, seq_length: int, truncation: str) -> None:
        from modules.layout import atomic_write_text

        saved = {"run": identity, "seq_length": seq_length, "truncation": truncation, "files": self.files}
        atomic_write_text(path, json.dumps(saved))

    @staticmethod
    def load(
        path: Path, identity: dict, seq_length: int, truncation: str, hashes: list[tuple[str, str]]
    ) -> ReferenceLogps | None:
        """The table at ``path`` if it was computed for this run, sequence length, truncation mode
        and data (each file's name and hash, in order); None where there is none or it does not fit."""
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        fits = saved.get("run") == identity and saved.get("seq_length") == seq_length
        fits = fits and saved.get("truncation", "keep_end") == truncation  # tables from before the flag: keep_end
        if not fits or [(f["name"], f["hash"]) for f in saved["files"]] != hashes:
            log.warning("%s was computed for another model, sequence length, truncation or data: it is not used", path)
            return None
        return ReferenceLogps(saved["files"])


def reference_table(
    files: list[tuple[str, str]], pairs: list[list[EncodedPair]], logps: torch.Tensor
) -> ReferenceLogps:
    """The table from each file's (name, hash), its pairs, and their log-probs in that order (rows, 2)."""
    entries, start = [], 0
    for (name, digest), file_pairs in zip(files, pairs, strict=True):
        values = logps[start : start + len(file_pairs)].tolist()
        entries.append({"name": name, "hash": digest, "lines": [p.line for p in file_pairs], "logps": values})
        start += len(file_pairs)
    return ReferenceLogps(entries)
