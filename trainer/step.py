"""One optimizer step of a rank's trainer (trainer.loop): its pipeline passes, the sums over the
replicas and the stages, clipping by the norm over all of them, the update, and the metrics row.

    zero the gradients
    passes over this replica's slots of the global batch (the objective's loss; the routers')
    tied ends' gradients summed; the step's totals and gradients summed over the replicas
    the pipeline's sums: squared norm, bytes, memory, notices, a lost replica's flag
    clip, update (a non-finite norm: every rank skips), the loss scale, the row
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

from comm.process_group import ReplicaLostError
from data.stream import Batch
from observability.metrics import NamedTotals, PipelineSums
from pipeline.schedule import RouterLoss
from trainer.rollout import rollout
from trainer.state import ReplicasChanged

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger(__name__)


def _micro_batches_per_step(trainer: Trainer) -> int:
    """Micro-batches a step's loss averages over: the global batch's, or in local and diloco
    mode (each replica steps on its own, as ``_loss_tokens`` counts) this replica's."""
    slots = len(trainer._slots(trainer.slots_per_step)) if trainer.cfg.dp.steps_alone else trainer.slots_per_step
    return slots * trainer.cfg.batch.micro_batches


def _router_loss(trainer: Trainer, scale: float = 1.0) -> RouterLoss | None:
    """The routers' load-balancing loss of one step (None where the model has none): each
    micro-batch adds ``coef * aux`` over the step's micro-batches (times the fp16 ``scale``),
    so the step's loss is the language-model loss plus ``coef`` times the mean aux."""
    balance = trainer.stage.balance
    if balance is None:
        return None
    return RouterLoss(balance, balance.coef * scale / _micro_batches_per_step(trainer))


def train_step(trainer: Trainer, batch: Batch | None, notice_pending: bool) -> tuple[dict[str, float], list[int]]:
    """One optimizer step on ``batch`` (None on the middle stages, which read no data): its
    metrics row, and the ranks that had a preemption notice (``notice_pending``: this rank has one),
    as the step's sums agreed. Raises ReplicasChanged where a run that regroups lost a
    replica (nothing stepped)."""
    cfg = trainer.cfg
    step = trainer.state.step + 1
    started = time.perf_counter()
    # Dropout masks come from (seed, step, rank) alone, so a resumed run draws the same ones.
    torch.manual_seed(cfg.data.seed * 1_000_003 + step * 10_007 + trainer.topo.rank)
    if trainer.objective.generates:  # the step's rows: completions generated now from its prompts
        batch = rollout(trainer, batch, step, trainer.stops)
    # The loss is the mean over every trained token of the global batch, so each
    # micro-batch's summed loss is divided by that count and replicas' gradients are summed.
    normalizer = max(1, _loss_tokens(trainer, batch)) if batch is not None else 1
    bytes_before = trainer.comm.bytes_sent
    scaler = trainer.state.scaler
    scale = scaler.scale if scaler is not None else 1.0  # fp16: keep small gradients representable
    trainer.optimizer.zero_grad()
    watch = trainer.optimizer.overlap(scale)  # gradient buckets leave during the last backward
    # a mixture of experts' load-balancing loss: each micro-batch's aux, averaged over the step's
    router = _router_loss(trainer, scale)
    loss_fn = trainer._step_loss(normalizer / scale)
    slots = trainer._slots(trainer.slots_per_step)
    with trainer.comm.tracer.span("pipeline", f"step {step}"):
        trainer.objective.before_pass(batch, slots, trainer.topo.is_last_stage)
        loss = trainer._run_slots(batch, slots, loss_fn, True, watch, router)
    # the step's totals summed over the replicas: its loss (the routers' summed aux, the objective's statistics)
    named = NamedTotals()
    named.add("loss", loss)
    if router is not None:
        named.add("aux_loss", router.total)
    if loss_fn.totals is not None:
        named.add("objective", loss_fn.totals)
    # one slot per replica: 1 in this replica's if this rank has a preemption notice
    dp = trainer.topo.data_size
    notice = torch.zeros(dp)
    notice[trainer.topo.replica] = float(notice_pending)
    named.add("notices", notice)
    totals = named.flat()

    trainer.tied.sum_ends(trainer.comm.all_reduce_ends)  # both ends' copies of a tied weight get the sum

    # the sum over replicas (in true units: divided by the fp16 loss scale), and this stage's
    # squared gradient norm
    lost = 0.0  # an elastic run's flag: another replica was lost, so this pipeline must not step
    try:
        totals, sq = trainer.optimizer.reduce(totals, scale)
    except ReplicaLostError as err:
        log.warning("%s; this pipeline is whole, so it regroups with the other survivors", err)
        lost, sq = 1.0, torch.zeros((), dtype=torch.float64)
    totals = named.read(totals)
    loss = totals["loss"][0] / scale

    # clipping by the norm over every stage's gradients; every rank sees the same norm, so
    # a non-finite one (an fp16 overflow anywhere) makes every stage and replica skip together;
    # with it, the bytes this pipeline's ranks sent between stages this step, and to other
    # replicas since the last row (local SGD's weight average comes after this point)
    dp_sent = trainer.optimizer.sync.bytes_sent
    sent = (trainer.comm.bytes_sent - bytes_before, dp_sent - trainer._dp_bytes_reported)
    trainer._dp_bytes_reported = dp_sent
    # and each stage's peak memory since the previous step's exchange (so its optimizer
    # update counts too) in a slot of its own: the sum is then a gather
    sums = PipelineSums(trainer.topo.stage, trainer.topo.pipeline_size)
    sums.add("squared_norm", sq)
    sums.add("comm_bytes", sent[0])
    sums.add("dp_bytes", sent[1])
    sums.add("trainable", trainer.trainable)
    sums.add("peak_mem_bytes", trainer.memory.peak_bytes(), per_stage=True)
    sums.add("peak_mem_estimate_bytes", trainer.estimate.total, per_stage=True)
    sums.add("lost", lost)
    for replica, noticed in enumerate(totals["notices"].tolist()):  # this stage's rank of each replica ...
        sums.add(f"notice/{replica}", noticed, per_stage=True)  # ... and, summed, every rank's
    trainer.memory.reset()
    summed = sums.reduce(trainer.comm.all_reduce_pipeline, trainer.device)
    if summed["lost"][0] > 0:  # some stage's gradient sum failed: no stage of this pipeline steps
        trainer.optimizer.rollback()
        raise ReplicasChanged(step)
    noticed = [(stage, r) for r in range(dp) for stage, n in enumerate(summed[f"notice/{r}"]) if n > 0]
    noticed_ranks = sorted(trainer.topo.rank_of(stage, r) for stage, r in noticed)
    grad_norm = math.sqrt(summed["squared_norm"][0])
    comm_bytes, dp_bytes = int(summed["comm_bytes"][0]), int(summed["dp_bytes"][0])
    trainable = int(summed["trainable"][0])
    stage_peaks = {f"peak_mem_bytes_stage{i}": int(v) for i, v in enumerate(summed["peak_mem_bytes"])}
    estimates = summed["peak_mem_estimate_bytes"]
    stage_estimates = {f"peak_mem_estimate_bytes_stage{i}": int(v) for i, v in enumerate(estimates)}
    finite = math.isfinite(grad_norm)
    if not finite:
        trainer.optimizer.rollback()
    lr = cfg.optim.lr_at(step)
    lost_in_update = 0.0
    if finite:
        clip = None
        if cfg.optim.max_grad_norm > 0:
            clip = min(1.0, cfg.optim.max_grad_norm / (grad_norm + 1e-6))
        with trainer.comm.tracer.span("optimizer step"):
            lost_in_update = _update(trainer, lr, clip)
    if trainer.cfg.comm.regroups and trainer.optimizer.sharded:
        # ZeRO-1 gathers the updated weights after the step: a replica lost there fails only
        # its stage's gather, so every stage of this pipeline learns it before the next step
        # (the regroup then reloads the last checkpoint: the update is not everyone's)
        flag = torch.tensor([lost_in_update], dtype=torch.float64, device=trainer.device)
        trainer.comm.all_reduce_pipeline(flag)
        if flag.item() > 0:
            raise ReplicasChanged(step)
    _after_step(trainer, step, finite, scale)
    trainer.optimizer.sync.end_of_step(step)  # local SGD and DiLoCo: the replicas meet again when due
    trainer.state.step = step
    elapsed = time.perf_counter() - started
    tokens = cfg.global_batch_sequences * cfg.data.seq_length
    row = {
        "step": step,
        "loss": float(loss),
        "lr": lr,
        "grad_norm": grad_norm,
        "step_time_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "comm_bytes": comm_bytes,
        "dp_bytes": dp_bytes,
        "trainable_params": trainable,
        "peak_mem_bytes": max(stage_peaks.values()),
        **stage_peaks,
        **stage_estimates,
    }
    if router is not None:  # HF's aux_loss (without the coefficient), the step's mean per micro-batch
        row["aux_loss"] = float(totals["aux_loss"][0]) / _micro_batches_per_step(trainer)
    if loss_fn.totals is not None:  # the objective's metrics (preference pairs: TRL's names, means over pairs)
        row.update(loss_fn.row(totals["objective"].tolist()))
    if not finite:
        row["skipped"] = True
    if trainer.state.scaler is not None:
        row["loss_scale"] = scale
    return row, noticed_ranks


def _update(trainer: Trainer, lr: float, clip: float | None) -> float:
    """The optimizer's step; 1.0 where an elastic run lost a replica in it (ZeRO-1's gather
    of the updated shards), else 0.0."""
    try:
        trainer.optimizer.step(lr, clip)
    except ReplicaLostError as err:
        if not trainer.cfg.comm.regroups:
            raise
        log.warning("%s after the update; this pipeline regroups with the other survivors", err)
        return 1.0
    return 0.0


def _loss_tokens(trainer: Trainer, batch: Batch) -> int:
    """What the loss is averaged over (tokens, or pairs: the objective's ``count``): the whole
    global batch, or in local and diloco mode (where each replica steps on its own) this
    replica's slices."""
    if not trainer.cfg.dp.steps_alone:
        return trainer.objective.step_count(batch, trainer.objective.count(batch.labels))
    return sum(
        trainer.objective.count(batch.labels[trainer._rows(slot)]) for slot in trainer._slots(trainer.slots_per_step)
    )


def _after_step(trainer: Trainer, step: int, finite: bool, scale: float) -> None:
    """fp16 adapts its loss scale (``scale``: the one this step used); every precision gives
    up after --max-nonfinite-steps non-finite steps in a row that no smaller scale could help
    (fp32/bf16: any; fp16: those already at the scale's floor, where halving is over)."""
    limit, state, scaler = trainer.cfg.optim.max_nonfinite_steps, trainer.state, trainer.state.scaler
    if scaler is not None:
        hopeless = not finite and scale <= scaler.floor
        scaler.update(finite)
        state.nonfinite_run = state.nonfinite_run + 1 if hopeless else 0
        if not finite:
            log.warning("step %d: gradients overflowed in fp16; skipped, loss scale now %g", step, scaler.scale)
        if state.nonfinite_run >= limit:
            raise FloatingPointError(
                f"fp16 cannot make progress: {state.nonfinite_run} steps in a row (up to step {step}) overflowed "
                f"at the smallest loss scale ({scaler.floor:g}), so the values themselves exceed fp16's "
                "range; train with --bf16 (or in fp32), or lower --lr; the last checkpoint is intact"
            )
        return
    state.nonfinite_run = 0 if finite else state.nonfinite_run + 1
    if not finite:
        log.warning("step %d: non-finite gradients; step skipped (%d in a row)", step, state.nonfinite_run)
    if state.nonfinite_run >= limit:
        raise FloatingPointError(
            f"{state.nonfinite_run} steps in a row (up to step {step}) had non-finite loss or gradients; "
            "lower --lr, check the data, or try --bf16; the last checkpoint is intact"
        )
