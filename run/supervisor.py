"""A rank's life in a run whose ranks may come and go: the supervisor around its trainer.

The trainer (trainer.loop) steps, evaluates and saves; the supervisor decides when, and what a
lost peer, a joiner or a preemption notice changes: it trains step after step, evaluates and
commits checkpoints when due, hands the metrics rows to the reporter (and the reporter's role to
a rank that takes it over), answers preemption notices, and in a run whose ranks regroup
(--elastic, --spares) turns a lost peer into a regroup and the same step, evaluation or commit
done again (run.elastic agrees with the survivors on the new generation).

    while step < total:
        batch -> trainer.step   (a lost peer: regroup, the same batch again)
        row -> metrics.jsonl    (the reporter: last stage of the first replica)
        notices -> commit and stop, a replica leaves, or spares take the noticed ranks' places
        evaluation, checkpoint, joiners taken in, when due
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from comm.process_group import PeerLostError, ReplicaLostError
from data.prefetch import Prefetcher
from data.stream import Batch
from observability.metrics import ONCE, MetricsWriter, Progress
from observability.profiling import Profiler
from run.elastic import ElasticController
from run.preemption import PreemptionNotice
from trainer.checkpoint import CheckpointWriteError
from trainer.loop import Trainer
from trainer.state import ReplicasChanged

log = logging.getLogger(__name__)
# logged beside an evaluation's loss
EVAL_SHOWN = ("perplexity", "rewards/accuracies", "rewards/margins", "accuracy", "margin")


class Supervisor:
    """Drives ``trainer`` through the run (module docstring)."""

    def __init__(self, trainer: Trainer, notice: PreemptionNotice, elastic: ElasticController | None) -> None:
        """``notice``: this process's preemption notice (run.preemption), shared with every rank
        at each step's end; ``elastic``: the controller of a run whose ranks regroup (None: one
        whose ranks never change)."""
        self.trainer, self.notice, self.elastic = trainer, notice, elastic
        self.cfg = trainer.cfg
        # the ranks that had a preemption notice, as the last step's sums agreed
        self.noticed: list[int] = []
        # a spare that took a place after a step, during its evaluation or checkpoint: where it starts
        self.joined_during: str | None = None

    @property
    def step(self) -> int:
        return self.trainer.state.step

    @property
    def events(self) -> list[dict]:
        """Metrics rows for the reporter not yet written (the trainer's state: a hand-over takes them along)."""
        return self.trainer.state.events

    @contextmanager
    def _regroup_on_loss(self, step: int, what: str, in_step: bool = False, commit: bool = False) -> Iterator[None]:
        """In a run that regroups (--elastic, --spares), a peer lost during a step, an evaluation
        or a checkpoint's ``commit`` does not stop this rank: it drops its process groups (whoever
        waits on it fails at once too), forgets what a step ``in_step`` carried into the sync
        state, and raises ReplicasChanged. The survivors' agreement then says whether its pipeline
        goes on (a spare in the lost rank's place) or leaves. Without spares, a failure of its own
        pipeline (any but a data-parallel one, outside a commit's control exchanges) cannot be
        mended: the rank leaves at once, as before, and its exit tells the survivors."""
        try:
            yield
        except PeerLostError as err:
            broken = self.cfg.comm.spares == 0 and not commit and not isinstance(err, ReplicaLostError)
            if self.elastic is None or broken:
                raise
            log.warning("%s, in %s; this rank regroups with the other survivors", err, what)
            self.trainer.comm.abandon(err)
            if in_step:
                self.trainer.optimizer.rollback()
            raise ReplicasChanged(step) from None

    def train_step(self, batch: Batch | None) -> dict[str, float]:
        """The trainer's step, its lost peer turned into ReplicasChanged (``_regroup_on_loss``)."""
        with self._regroup_on_loss(self.step + 1, f"step {self.step + 1}", in_step=True):
            row, self.noticed = self.trainer.step(batch, self.notice.pending)
            return row

    def _evaluation_row(self) -> dict[str, float] | None:
        """``evaluate()``; in an elastic run that loses a replica meanwhile, the survivors regroup
        and evaluate again (the same batches, split over fewer replicas)."""
        while True:
            try:
                with self._regroup_on_loss(self.step, f"the evaluation after step {self.step}"):
                    return self.trainer.evaluate()
            except ReplicasChanged:
                self.elastic.regroup(self.step, during="evaluation")

    def checkpoint(self, must: bool = False) -> None:
        """Commit this step's checkpoint. One that some rank could not write was abandoned on
        every rank (trainer.checkpoint); it stops the run, unless --on-checkpoint-error continue
        lets training go on to the next one (not when ``must``, nor at the last step)."""
        try:
            self._commit()
        except CheckpointWriteError as err:
            cfg = self.cfg
            if must or cfg.checkpoint.on_error == "stop" or self.step >= cfg.optim.total_steps:
                raise
            ahead = min(self.step + cfg.checkpoint.every_steps - self.step % cfg.checkpoint.every_steps,
                        cfg.optim.total_steps)  # fmt: skip
            log.warning("%s; training goes on (--on-checkpoint-error continue), next try at step %d", err, ahead,
                        extra=ONCE)  # fmt: skip
            self.events.append({"step": self.step, "event": "checkpoint failed", "error": str(err),
                                "unix_time": time.time()})  # fmt: skip

    def _commit(self) -> None:
        """``trainer.save``. In a run whose ranks regroup (--elastic, --spares), a rank lost during the
        commit fails its gathers on every survivor before any of them moves ``latest`` (or, lost
        after the last one, each has moved it): the survivors regroup and commit the same step
        again, so it ends committed on every one of them."""
        while True:
            try:
                with self._regroup_on_loss(self.step, f"the commit of checkpoint {self.step}", commit=True):
                    self.trainer.save()
                return
            except ReplicasChanged:
                self.elastic.regroup(self.step, during="checkpoint")

    def _answer_notice(self, metrics: MetricsWriter | None) -> bool:
        """Every rank, at the end of a step where some rank had a preemption notice: with --spares
        and a free spare for each noticed rank, spares take their places (``_replace_noticed``);
        else without --elastic (or if too few replicas would stay) the whole run commits this step
        and stops; with it, the noticed replicas leave and the others regroup and train on (where
        the state goes through a checkpoint, ZeRO-1, local SGD and DiLoCo, every replica commits
        this step first, and the survivors load it). True: stop."""
        if self.cfg.comm.spares and self.elastic.enough_spares(len(self.noticed)):
            return self._replace_noticed()
        noticed = self._noticed_replicas()
        staying = self.trainer.topo.data_size - len(noticed)
        if not self.cfg.comm.elastic or staying < max(1, self.cfg.dp.min_replicas):
            self._stop_for_notice(metrics)
            return True
        if not self.cfg.dp.replicated:  # the survivors go on through a checkpoint: this step's loses nothing
            self.checkpoint(must=True)
        self.trainer.comm.quiesce(f"the notice after step {self.step}")
        if self.trainer.topo.replica in noticed:
            self._leave_for_notice()
            return True
        self.elastic.regroup(self.step, why="preempted")
        return False

    def _noticed_replicas(self) -> list[int]:
        return sorted({rank // self.trainer.topo.pipeline_size for rank in self.noticed})

    def _replace_noticed(self) -> bool:
        """--spares, a free spare for each noticed rank: every rank commits this step (so nothing
        is lost, and it is what every rank loads where no live replica can hand a spare its stage's
        state), the noticed ranks leave, and the others regroup with spares in their places and
        go on from this step, its evaluation (when due) done with them. True: this rank left."""
        started = time.perf_counter()
        self.checkpoint(must=True)
        launch_ranks = self.trainer.comm.elastic.membership.launch_ranks()
        self.events.append({"step": self.step, "event": "preempted",
                            "noticed_launch_ranks": [launch_ranks[r] for r in self.noticed],
                            "commit_s": time.perf_counter() - started, "unix_time": time.time()})  # fmt: skip
        self.trainer.comm.quiesce(f"the notice after step {self.step}")
        if self.trainer.topo.rank in self.noticed:
            self.trainer.comm.leave(f"preempted ({self.notice.signal_name or 'a notice'})", replaceable=True)
            after = f", {self.notice.seconds_since():.1f}s after the notice" if self.notice.pending else ""
            log.warning("preempted: step %d is committed and this rank leaves%s; a spare takes its place", self.step,
                        after)  # fmt: skip
            return True
        self.elastic.regroup(self.step, why="preempted", during="evaluation")
        return False

    def _stop_for_notice(self, metrics: MetricsWriter | None) -> None:
        """Every rank, at the step boundary where the run learned of a preemption notice: commit
        this step's checkpoint and say so; train() then returns and the process exits 0."""
        started = time.perf_counter()
        self.checkpoint(must=True)  # the notice's whole point: no stopping without it
        took = time.perf_counter() - started
        if self.notice.pending:
            log.warning("preempted (%s): step %d committed to %s in %.1fs, %.1fs after the notice; exiting",
                        self.notice.signal_name, self.step, self.cfg.checkpoint.path, took,
                        self.notice.seconds_since())  # fmt: skip
        else:
            noticed = self._noticed_replicas()
            where = f"replica{'s' if len(noticed) > 1 else ''} {', '.join(map(str, noticed))}"
            log.warning("a preemption notice reached %s: step %d committed to %s in %.1fs; every rank exits",
                        where, self.step, self.cfg.checkpoint.path, took, extra=ONCE)  # fmt: skip
        if metrics is not None:
            metrics.write({"step": self.step, "event": "preempted", "noticed_replicas": self._noticed_replicas(),
                           "commit_s": took, "unix_time": time.time()})  # fmt: skip

    def _leave_for_notice(self) -> None:
        """A rank of an elastic run's replica that had a preemption notice, while other replicas
        train on: leave cleanly (their agreement sees this replica go); train() then returns, exit 0."""
        self.trainer.comm.leave(f"preempted ({self.notice.signal_name or 'a notice to its replica'})")
        after = f", {self.notice.seconds_since():.1f}s after the notice" if self.notice.pending else ""
        log.warning("preempted: this replica leaves the elastic run after step %d%s; the other replicas train on",
                    self.step, after)  # fmt: skip

    def _report_events(
        self, metrics: MetricsWriter | None, progress: Progress | None
    ) -> tuple[MetricsWriter | None, Progress | None]:
        """The metrics writer and progress bar, opened once this rank is the reporter (from the
        start, or since a regroup made it so) and closed when a joining replica takes that role
        back, with --elastic's pending event rows written; every other rank drops them."""
        if not self.trainer.is_reporter and metrics is not None:
            progress.close()
            metrics.close()
            metrics = progress = None
        if self.trainer.is_reporter and metrics is None:
            cfg = self.cfg
            metrics = MetricsWriter(cfg.checkpoint.path / "metrics.jsonl", cfg.log_backend, cfg.project_name,
                                    cfg.summary())  # fmt: skip
            progress = Progress(cfg.optim.total_steps, self.step)
        for event in self.events if metrics is not None else []:
            metrics.write(event)
        self.events.clear()
        return metrics, progress

    def _after_step_row(
        self, metrics: MetricsWriter | None, progress: Progress | None, first: str = "evaluation"
    ) -> tuple[MetricsWriter | None, Progress | None]:
        """What follows a step's row: the evaluation when due, the checkpoint when due, and
        replicas asking to join taken in (a spare that took its place in the checkpoint's commit
        starts there: ``first``)."""
        cfg, total = self.cfg, self.cfg.optim.total_steps
        if first == "evaluation" and cfg.evaluation.due(self.step, total):
            valid = self._evaluation_row()
            metrics, progress = self._report_events(metrics, progress)  # and have a new reporter
            if metrics is not None and valid is not None:
                metrics.write(valid)
                shown = " ".join(f"{k[6:]} {v:.4g}" for k, v in valid.items() if k[6:] in EVAL_SHOWN)
                log.info("step %d valid loss %.4f %s", self.step, valid["valid.loss"], shown)
        if self.step % cfg.checkpoint.every_steps == 0 or self.step == total:
            self.checkpoint()
        if self.elastic is not None:
            self.elastic.grow_if_due(self.checkpoint)
        return metrics, progress

    def train(self) -> None:
        """Train to --total-steps (or until a notice stops this rank), step by step."""
        cfg, trainer = self.cfg, self.trainer
        total = cfg.optim.total_steps
        if self.step >= total:
            log.info("nothing to do: the checkpoint is at step %d of --total-steps %d", self.step, total)
            return
        metrics = progress = None
        pin = trainer.device.type == "cuda"
        prefetch = (
            Prefetcher(trainer.stream, cfg.global_batch_sequences, pin_memory=pin)
            if trainer.stream is not None
            else None
        )
        profiler = Profiler(cfg.profiling, cfg.checkpoint.path, cfg.batch.micro_batches, trainer.comm)
        trainer.memory.reset()
        first_step = self.step + 1
        try:
            if self.joined_during is not None:  # a spare that took its place after this step
                metrics, progress = self._after_step_row(metrics, progress, first=self.joined_during)
            while self.step < total:
                metrics, progress = self._report_events(metrics, progress)
                with self.trainer.comm.tracer.span("step", f"step {self.step + 1}"):
                    batch = after = None
                    if prefetch is not None:
                        batch, after = prefetch.next()
                    row = None
                    while row is None:
                        try:
                            row = self.train_step(batch)
                        except ReplicasChanged:  # nothing stepped: the survivors redo it with the same batch
                            self.elastic.regroup(self.step + 1)
                    if prefetch is not None:
                        trainer.state.data = after  # trained on: where a checkpoint, joiner or spare goes on from
                metrics, progress = self._report_events(metrics, progress)  # who left, before the step's row
                if self.step == first_step:  # the optimizer's state exists from its first update
                    log.info("optimizer state held on this rank: %.3g GB (%d bytes)",
                             trainer.optimizer.held_bytes() / 1e9, trainer.optimizer.held_bytes())  # fmt: skip
                profiler.stepped()
                if metrics is not None:
                    metrics.write(row)
                    progress.update(row)
                    if self.step % cfg.log_interval == 0 or self.step == total:
                        log.info(
                            "step %d/%d loss %.4f lr %.3g %.0f tok/s",
                            row["step"], total, row["loss"], row["lr"], row["tokens_per_s"],
                        )  # fmt: skip
                if self.noticed:  # a preemption notice reached some rank (run.preemption)
                    if self._answer_notice(metrics):
                        break  # this rank is done: the step is committed, or its replica left
                metrics, progress = self._after_step_row(metrics, progress)
        finally:
            if prefetch is not None:
                prefetch.close()
            if metrics is not None:
                progress.close()
                metrics.close()
        profiler.finish()
