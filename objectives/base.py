"""What an objective gives the trainer: the contract every file of objectives/ keeps.

The schedule and the stage know no objective by name. For each micro-batch the last stage's
output and the micro-batch's own ``targets`` (a dict of tensors the objective made from the
batch, opaque to the schedule) go to a ``StepLoss``, a fresh one for each step or evaluation,
which returns that micro-batch's loss and sums the statistics its metrics need (``totals``,
added to the step's sums over the replicas). An objective also says what its rows are (pairs or
not), what its loss averages over (``count``), whether it reads the logits or the final norm's
output, which parts it adds to the last stage (a reward model's score head) and what runs before
each pass (DPO's frozen reference).

    stage s <  p-1:   hidden ------------------------------------------------> next stage
    stage p-1:        output (logits, or the final norm's output) --+
                      targets (objective.targets(batch rows)) ------+--> StepLoss -> loss
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from comm.process_group import Communicator
from data.stream import IGNORE_INDEX, Batch, TaskSpec, TokenStream

Targets = dict[str, torch.Tensor]  # a micro-batch's targets on the last stage, rows first
# a forward-only pass of ``module`` (a stage) over this replica's ``slots`` of a batch, each
# micro-batch's last-stage output and targets handed to the function given
RunForward = Callable[[Batch | None, range, Callable[[torch.Tensor, Targets], torch.Tensor], nn.Module], object]


@dataclass(frozen=True)
class RunContext:
    """What of the run an objective may need besides its own settings (DPO's reference does)."""

    lora: bool  # adapters train, the base never changes
    batch_size: int  # sequences a replica runs per slot of a batch
    launched: int  # the replicas the run launched with: an evaluation batch's slots
    folder: Path  # --checkpoint-path
    seq_length: int
    truncation: str  # --truncation-mode of preference pairs
    files: tuple[TaskSpec, ...]  # the training tasks, then the evaluation's
    chunk: int  # tokens the output layer projects at a time (0: logits)
    device: str


class StepLoss:
    """The last stage's loss of one step (or evaluation), a micro-batch at a time. ``totals``:
    this step's summed statistics for the metrics row (None: the objective reports none)."""

    totals: torch.Tensor | None = None

    def __call__(self, out: torch.Tensor, targets: Targets) -> torch.Tensor:
        """The micro-batch's loss (over the step's normalizer) from the last stage's ``out``."""
        raise NotImplementedError

    def row(self, totals: list[float], prefix: str = "") -> dict[str, float]:
        """The metrics of the summed ``totals`` (over micro-batches and replicas), names prefixed."""
        return {}


class Objective:
    """What the last stage trains for; one subclass per file of objectives/."""

    name = ""
    pairs = False  # rows come as (chosen, rejected) pairs; --batch-size counts pairs
    reads_logits = True  # False: the loss reads the final norm's output (a head of its own)
    generates = False  # True: each step's rows are completions the pipeline generates (trainer.rollout)
    uses_output_layer = True  # False: the output layer stays as loaded, frozen and untied
    # parts the objective adds to the last stage, by shard name: built (on the meta device) from
    # the model's config, saved as a part of their own and trained whole under LoRA
    parts: dict[str, Callable[[object], nn.Module]] = {}  # noqa: RUF012 - read only, per class

    def stage_options(self) -> dict:
        """What pipeline.stage.Stage takes of this objective: the parts it adds to the last stage
        and whether the output layer is used."""
        return {"extra": self.parts, "output_used": self.uses_output_layer}

    def targets(self, batch: Batch, rows: slice, slot: int, first_file: int, pad_id: int) -> Targets:
        """The targets of ``rows`` of ``batch`` (slot ``slot``; ``first_file``: the batch's
        tasks' place among all the run's files) on the CPU; the trainer moves them."""
        return {"labels": batch.labels[rows]}

    def count(self, labels: torch.Tensor) -> int:
        """What the loss of these rows averages over: the trained tokens that have one before them."""
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def step_count(self, batch: Batch, counted: float) -> float:
        """The step's normaliser, ``counted`` from the batch's rows unless the batch knows it
        better (GRPO's: what every replica generated, summed over them)."""
        return counted

    def step_loss(self, stage: nn.Module, normalizer: float, chunk: int, device: torch.device) -> StepLoss:
        """A fresh loss for one step or evaluation on the last ``stage``, each micro-batch's loss
        divided by ``normalizer``; ``chunk``: tokens the output layer projects at a time (0: the
        stage hands over the logits); its statistics are summed on ``device``."""
        raise NotImplementedError

    def evaluation_row(self, loss: float, count: float, loss_fn: StepLoss, totals: list[float]) -> dict[str, float]:
        """The evaluation's row from its summed ``loss``, ``count`` and statistics ``totals``."""
        return {"valid.loss": loss / max(1.0, count), **loss_fn.row(totals, prefix="valid.")}

    def probe_targets(self, rows: int, seq: int, vocab: int, device: torch.device) -> Targets:
        """Targets of the right shapes for the start-up memory probe (values irrelevant)."""
        return {"labels": torch.randint(vocab, (rows, seq), device=device)}

    # -- what runs around the passes (DPO's reference) ---------------------------------------------

    extra_bytes = 0  # memory it holds besides the stage (a frozen copy), for the start-up estimate
    needs_preparing = False  # whether ``prepare`` has anything to do (it runs collectives)

    def start(self, stage: nn.Module, run: RunForward, context: RunContext) -> None:
        """Once the stage is built, before any checkpoint loads (``stage`` holds the starting
        weights); ``run`` runs forward-only passes of the pipeline."""

    def prepare(self, comm: Communicator, step: int, identity: dict, data: TokenStream | None, slots: range) -> None:
        """Every rank, before the first step (after a resume too); ``data``: the training stream
        (None on the middle stages); ``slots``: this replica's of an evaluation-sized batch."""

    def before_pass(self, batch: Batch | None, slots: range, is_last: bool) -> None:
        """Before each step's or evaluation batch's passes over this replica's ``slots``."""
