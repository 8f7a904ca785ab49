"""Preference pairs and their losses: DPO (Rafailov et al. 2023), SimPO (Meng et al. 2024) and
reward models, over the pipeline.

A pair (data.sources.Pair) becomes two sequences, chosen then rejected, next to each other in
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

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data.pairs import EncodedPair

log = logging.getLogger(__name__)
REFERENCE_FILE = "dpo_reference.json"


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
