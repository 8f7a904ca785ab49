"""DPO's reference log-probabilities on the last stage: where they come from (objectives/dpo.py
has the loss; the trainer runs the passes this asks for).

- ``--dpo-reference precomputed`` (``prepare``): one forward-only pass over every pair of the
  training and evaluation files before the first step, with the starting weights (LoRA: its
  adapters off), each replica a slot of each batch; the last stages keep the whole table and
  store it in ``<checkpoint-path>/dpo_reference.json`` (``ReferenceLogps``, by file and record
  line with each file's hash), which a resume (in any topology) reads.
- ``--dpo-reference frozen`` (``forward``): each batch's pairs go forward through the starting
  weights first, a frozen copy of the stage (LoRA: this stage with its adapters off, no copy).

Both passes run eval-mode (no dropout), without autograd; the log-probs come through the output
layer of the module that ran (objectives.pairs.stage_logps).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from comm.process_group import Communicator
from data.pairs import EncodedPair, all_pairs, data_hash
from data.stream import Batch, TaskSpec, TokenStream, pair_batch
from modules.lora import adapters_disabled
from objectives.base import RunContext, RunForward, Targets
from objectives.pairs import stage_logps
from observability.metrics import ONCE

log = logging.getLogger(__name__)
REFERENCE_FILE = "dpo_reference.json"


class DpoReference:
    """The reference log-probs of the pairs the last stage scores (``rows``)."""

    def __init__(self, settings: RunContext, per_step: bool, stage: nn.Module, run: RunForward) -> None:
        """Made before any checkpoint loads: ``stage`` still holds the starting weights, which
        ``--dpo-reference frozen`` (``per_step``) copies (not under LoRA, whose base never changes)."""
        self.settings, self.stage, self.run = settings, stage, run
        self.frozen = copy.deepcopy(stage).requires_grad_(False).eval() if per_step and not settings.lora else None
        self.per_step = per_step
        self.table: ReferenceLogps | None = None  # precomputed: every pair's, on the last stage
        self.by_slot: dict[int, torch.Tensor] | None = None  # frozen: the batch being run's, by slot

    @property
    def extra_bytes(self) -> int:
        """Memory the reference holds besides the stage (the frozen copy)."""
        return sum(p.nbytes for p in self.frozen.parameters()) if self.frozen is not None else 0

    def rows(self, batch: Batch, slot: int, rows: slice, first_file: int) -> torch.Tensor | None:
        """The reference log-probs of ``slot``'s sequences (``rows`` of ``batch``), or None before
        there are any; ``first_file``: the batch's tasks' place among the table's files."""
        if self.by_slot is not None:
            return self.by_slot[slot]
        if self.table is None:
            return None
        tasks, lines = batch.tasks[rows][::2], batch.records[rows][::2]  # a pair's two sequences share them
        return self.table.rows([(first_file + t, n) for t, n in zip(tasks, lines, strict=True)])

    def _run_as_reference(self, module: nn.Module, batch: Batch | None, slots: range, recorded: list) -> None:
        """A forward-only pass of ``module`` over ``slots`` of ``batch``, appending each
        micro-batch's per-sequence log-probs to ``recorded`` (on the last stage). The log-probs
        come through ``module``'s own output layer: a frozen copy's, never the trained stage's."""

        def record(out: torch.Tensor, targets: Targets) -> torch.Tensor:
            recorded.append(stage_logps(module, out, targets["labels"], self.settings.chunk).detach())
            return recorded[-1].sum()

        training = module.training
        module.eval()  # the reference is the model itself: no dropout
        with adapters_disabled(module):
            self.run(batch, slots, record, module)
        module.train(training)

    # -- frozen ---------------------------------------------------------------------------------

    def forward(self, batch: Batch | None, slots: range, is_last: bool) -> None:
        """--dpo-reference frozen: the reference log-probs of this replica's ``slots`` of ``batch``,
        kept for the pass over the same slots that follows."""
        self.by_slot, recorded = None, []
        self._run_as_reference(self.frozen if self.frozen is not None else self.stage, batch, slots, recorded)
        if is_last:
            size = self.settings.batch_size
            values = torch.cat(recorded)  # the slots' sequences in order
            self.by_slot = {slot: values[k * size : (k + 1) * size] for k, slot in enumerate(slots)}

    # -- precomputed ----------------------------------------------------------------------------

    def prepare(self, comm: Communicator, step: int, identity: dict, data: TokenStream | None, slots: range) -> None:
        """Every last stage gets every pair's reference log-probs: read from the checkpoint
        folder where this run stored them, else computed by one pass with the starting weights,
        this replica running ``slots`` of each batch. A resumed (``step`` > 0) full fine-tuning
        run no longer holds those: without the file it stops. ``data``: the training stream, whose
        reading of pairs the pass repeats (None on the middle stages, which read no data)."""
        settings, topo = self.settings, comm.topo
        path = Path(settings.folder) / REFERENCE_FILE
        files = list(settings.files) if data is not None else []
        hashes = [(task.path.name, data_hash(task.path)) for task in files] if topo.is_last_stage else []
        if topo.is_last_stage:
            self.table = ReferenceLogps.load(path, identity, settings.seq_length, settings.truncation, hashes)
        if all(comm.all_gather_object(self.table is not None or not topo.is_last_stage)):
            log.info("DPO reference log-probs read from %s", path, extra=ONCE)
            return
        if step > 0 and not settings.lora:
            raise ValueError(
                f"{path} is missing or does not fit the data, and this resumed run no longer holds the weights it "
                "started from (the DPO reference); put the run's own file back, or start a new run from the "
                "starting model in another --checkpoint-path"
            )
        started = time.perf_counter()
        table = self._pass(comm, files, hashes, data, slots)
        if topo.is_last_stage:
            self.table = table
            table.save(path, identity, settings.seq_length, settings.truncation)
        log.info("DPO reference log-probs of every pair computed in %.1fs (kept in %s)",
                 time.perf_counter() - started, path, extra=ONCE)  # fmt: skip

    def _pass(
        self, comm: Communicator, files: list[TaskSpec], hashes: list[tuple[str, str]], data: TokenStream | None,
        slots: range,
    ) -> ReferenceLogps | None:  # fmt: skip
        """One forward-only pass over every pair of ``files``, each replica a slot of each batch;
        the last stages' tables (every pair's log-probs) are complete once summed over replicas."""
        settings, topo = self.settings, comm.topo
        pairs: list[list] = []
        if data is not None:
            pairs = [all_pairs(data.pair_packer(task), settings.seq_length) for task in files]
        flat = [pair for file_pairs in pairs for pair in file_pairs]
        total = max(comm.all_gather_object(len(flat)))  # the middle stages read no data
        per_batch = settings.batch_size // 2 * settings.launched  # pairs: a slot of each replica
        logps = torch.zeros(total, 2, dtype=torch.float32, device=settings.device)
        recorded: list[torch.Tensor] = []
        for start in range(0, total, per_batch):
            batch = None
            if flat:  # the last batch is filled up with its last pair, whose values are not kept
                chunk = flat[start : start + per_batch]
                chunk += chunk[-1:] * (per_batch - len(chunk))
                rows = [row for pair in chunk for row in (pair.chosen, pair.rejected)]
                batch = pair_batch(rows, [0] * len(rows), [pair.line for pair in chunk for _ in range(2)])
            recorded.clear()
            self._run_as_reference(self.stage, batch, slots, recorded)
            if topo.is_last_stage:
                values = torch.cat(recorded).reshape(-1, 2)  # this replica's slot, in order
                first = start + topo.replica * settings.batch_size // 2
                kept = max(0, min(len(values), total - first))
                logps[first : first + kept] = values[:kept]
        if not topo.is_last_stage:
            return None
        comm.all_reduce_data(logps)  # each pair filled by exactly one replica: the sum is exact
        return reference_table(hashes, pairs, logps.cpu())


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
