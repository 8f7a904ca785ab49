"""DPO's reference log-probabilities on the last stage: where they come from (trainer.preference
has the pairs and the loss, trainer.loop runs the passes).

- ``--dpo-reference precomputed`` (``prepare``): one forward-only pass over every pair of the
  training and evaluation files before the first step, with the starting weights (LoRA: its
  adapters off), each replica a slot of each batch; the last stages keep the whole table and
  store it in ``<checkpoint-path>/dpo_reference.json``, which a resume (in any topology) reads.
- ``--dpo-reference frozen`` (``forward``): each batch's pairs go forward through the starting
  weights first, a frozen copy of the stage (LoRA: this stage with its adapters off, no copy).

Both passes run eval-mode (no dropout), without autograd.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from comm.process_group import Communicator
from data.pairs import all_pairs, data_hash
from data.stream import Batch, TaskSpec, TokenStream, pair_batch, parse_task_names
from modules.lora import adapters_disabled
from observability.metrics import ONCE
from pipeline.schedule import LossFn, MicroBatch
from trainer.config import RunConfig
from trainer.preference import REFERENCE_FILE, ReferenceLogps, reference_table

log = logging.getLogger(__name__)
# a forward-only pass of ``module`` (a stage) over this replica's ``slots`` of a batch
RunForward = Callable[[Batch | None, range, LossFn, nn.Module], object]
# (output, labels, the stage that computed the output) -> (rows,): a chunked loss projects the
# final norm's output through that stage's own output layer
SequenceLogps = Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]


class DpoReference:
    """The reference log-probs of the pairs the last stage scores (``rows``)."""

    def __init__(self, cfg: RunConfig, stage: nn.Module, run: RunForward, sequence_logps: SequenceLogps) -> None:
        """Made before any checkpoint loads: ``stage`` still holds the starting weights, which
        ``--dpo-reference frozen`` copies (not under LoRA, whose base never changes)."""
        self.cfg, self.stage, self.run, self.sequence_logps = cfg, stage, run, sequence_logps
        per_step = cfg.objective.reference == "frozen"
        self.frozen = copy.deepcopy(stage).requires_grad_(False).eval() if per_step and cfg.lora is None else None
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

        def record(out: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
            recorded.append(self.sequence_logps(out, micro.labels, module).detach())
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
            size = self.cfg.batch.batch_size
            values = torch.cat(recorded)  # the slots' sequences in order
            self.by_slot = {slot: values[k * size : (k + 1) * size] for k, slot in enumerate(slots)}

    # -- precomputed ----------------------------------------------------------------------------

    def prepare(self, comm: Communicator, step: int, identity: dict, data: TokenStream | None, slots: range) -> None:
        """Every last stage gets every pair's reference log-probs: read from the checkpoint
        folder where this run stored them, else computed by one pass with the starting weights,
        this replica running ``slots`` of each batch. A resumed (``step`` > 0) full fine-tuning
        run no longer holds those: without the file it stops. ``data``: the training stream, whose
        reading of pairs the pass repeats (None on the middle stages, which read no data)."""
        cfg, topo = self.cfg, comm.topo
        path = Path(cfg.checkpoint.path) / REFERENCE_FILE
        files = self._files() if data is not None else []
        hashes = [(task.path.name, data_hash(task.path)) for task in files] if topo.is_last_stage else []
        if topo.is_last_stage:
            self.table = ReferenceLogps.load(path, identity, cfg.data.seq_length, cfg.data.pair_truncation, hashes)
        if all(comm.all_gather_object(self.table is not None or not topo.is_last_stage)):
            log.info("DPO reference log-probs read from %s", path, extra=ONCE)
            return
        if step > 0 and cfg.lora is None:
            raise ValueError(
                f"{path} is missing or does not fit the data, and this resumed run no longer holds the weights it "
                "started from (the DPO reference); put the run's own file back, or start a new run from the "
                "starting model in another --checkpoint-path"
            )
        started = time.perf_counter()
        table = self._pass(comm, files, hashes, data, slots)
        if topo.is_last_stage:
            self.table = table
            table.save(path, identity, cfg.data.seq_length, cfg.data.pair_truncation)
        log.info("DPO reference log-probs of every pair computed in %.1fs (kept in %s)",
                 time.perf_counter() - started, path, extra=ONCE)  # fmt: skip

    def _files(self) -> list[TaskSpec]:
        """The files whose pairs the table covers: the training tasks, then the evaluation's."""
        cfg = self.cfg
        evaluation = parse_task_names(str(cfg.evaluation.path)) if cfg.evaluation.path is not None else ()
        return [*cfg.data.tasks, *evaluation]

    def _pass(
        self, comm: Communicator, files: list[TaskSpec], hashes: list[tuple[str, str]], data: TokenStream | None,
        slots: range,
    ) -> ReferenceLogps | None:  # fmt: skip
        """One forward-only pass over every pair of ``files``, each replica a slot of each batch;
        the last stages' tables (every pair's log-probs) are complete once summed over replicas."""
        cfg, topo = self.cfg, comm.topo
        pairs: list[list] = []
        if data is not None:
            pairs = [all_pairs(data.pair_packer(task), cfg.data.seq_length) for task in files]
        flat = [pair for file_pairs in pairs for pair in file_pairs]
        total = max(comm.all_gather_object(len(flat)))  # the middle stages read no data
        launched = cfg.topology.data_size
        per_batch = cfg.batch.batch_size // 2 * launched  # pairs: a slot of each replica
        logps = torch.zeros(total, 2, dtype=torch.float32, device=cfg.device)
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
                first = start + topo.replica * cfg.batch.batch_size // 2
                kept = max(0, min(len(values), total - first))
                logps[first : first + kept] = values[:kept]
        if not topo.is_last_stage:
            return None
        comm.all_reduce_data(logps)  # each pair filled by exactly one replica: the sum is exact
        return reference_table(hashes, pairs, logps.cpu())
