"""Our GPipe, 1F1B and zero-bubble (zb1) steps next to torch.distributed.pipelining's ScheduleGPipe,
Schedule1F1B and ScheduleInterleavedZeroBubble.

    python bench/pipeline_vs_torch.py [--micro-batch-sizes 1,2] [--steps 30] [--seq-length 32]

Starts 2 ranks itself (Gloo on CPU, each pinned to its own core with one thread). Both ranks
build the same tiny GPT-NeoX (convert.tiny_model.tiny_config, random weights from a seed) and
hold one ``Stage`` each: stage 0 = embedding + first half of the layers, stage 1 = the rest + head
(``build_stage``). For every schedule (GPipe, 1F1B, ZB1) and micro-batch size, each round runs,
on the same stage objects and the same batch, with gradients zeroed after each (outside the timing):

  ours     pipeline.schedule.gpipe_step / one_f_one_b_step / zero_bubble_step over Communicator.connect,
           as trainer/loop.py calls them
  torch    torch.distributed.pipelining: PipelineStage (wrapping the same Stage) + ScheduleGPipe /
           Schedule1F1B / ScheduleInterleavedZeroBubble (one stage per rank)
  compute  each stage's forwards and backwards alone on its core, one stage at a time, no links
           (for ZB1 each backward as B then W, as zero_bubble_step splits it)

Our ZB1 runs on a second copy of the stage (the same weights): pipeline.weight_grad replaces its
linear layers' forwards for good, and torch's zero-bubble schedule, which splits the backward through
autograd itself, must see plain layers. Rounds alternate the order of ours and torch so both see
the same noise; the table gives medians over rounds, and ours/torch is the median of the
per-round ratios. "compute" is the sum over stages (the work one core would do alone); "ideal"
is the step the measured per-micro-batch compute allows when links cost nothing, simulated
over the order pipeline.schedule's own code runs (``schedule_orders``, ``simulate``): the limit ours
and torch chase. Before timing, ours and torch (and for 1F1B and ZB1, our GPipe) must give the
same loss and gradients, so they are timed doing the same work. Other processes on the same
cores show up as a warning about noisy figures.

    python bench/pipeline_vs_torch.py --end-to-end [--rounds 3] [--steps 12] [--warmup 2]

times whole training steps instead, on bench/common.py's model (4 layers, hidden 256, 8 heads), seq 128,
batch 8 in micro-batches of 1 (m = 8 on p = 2 stages), fp32, every schedule of both sides, with one
batch per optimizer step and with 4 accumulated:

  ours     dist_clm_train.py (2 ranks, each under taskset on its own core): step_time_s of metrics.jsonl;
           with --gradient-accumulate-step 4, 1F1B and zb1 run the 32 micro-batches as one pipeline pass
           (GPipe keeps one pass per batch)
  torch    a bare loop as a user would write it: PipelineStage + ScheduleGPipe / Schedule1F1B /
           ScheduleInterleavedZeroBubble, called once per accumulated batch, clipping by the norm over
           both stages (an all_reduce of its square), AdamW, timed on rank 0

Each run trains --steps steps and times all but the first --warmup; rounds alternate who runs first.
Every row is set against torch's best schedule for the same batches per step; the verdicts set
each side's best at 1F1B's memory (1F1B, zb1 / Schedule1F1B, ScheduleInterleavedZeroBubble) beside
the targets (<= 0.90x with one batch, <= 0.85x with 4 accumulated), then the best of any memory.
Each round also runs our zb1 once more with --profiling tidy_profiling for the compute floor: the
most, over ranks, of a rank's compute per step (forwards, backwards, optimizer) plus the first
forwards of the stages before it, which no schedule over these stages can go below (torch's loop
computes the same stages); set against torch's best of the same round, it says whether a target
is within reach of scheduling at all on this machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, _PipelineSchedule

from bench.common import ROOT, build_model, rank_core
from bench.common import run as run_trainer
from comm.config import CommConfig
from comm.process_group import Communicator
from comm.rendezvous import free_port
from comm.topology import Topology
from comm.trace import LANES
from convert.tiny_model import tiny_config
from modules import family_for, load_config
from objectives.loss import token_loss
from observability.profiling import COMPUTE
from pipeline.partition import split_layers
from pipeline.schedule import MicroBatch, StepSpec, gpipe_step, one_f_one_b_step, zero_bubble_step
from pipeline.simulate import ScheduleStep, closed_form_idle, schedule_orders, simulate
from pipeline.stage import Stage
from pipeline.weight_grad import DeferredWeightGrads, deferred_weight_grads

log = logging.getLogger("bench.pipeline_vs_torch")
STAGES = 2  # one stage per rank, one rank per core
TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, labels) -> loss, as torch's schedules take
SEED = 0
# Table name -> (our step, torch's schedule class): the same schedule on both sides; the name
# lower-cased is our --pp-mode.
SCHEDULES: dict[str, tuple[ScheduleStep, type[_PipelineSchedule]]] = {
    "GPipe": (gpipe_step, ScheduleGPipe),
    "1F1B": (one_f_one_b_step, Schedule1F1B),
    "ZB1": (zero_bubble_step, ScheduleInterleavedZeroBubble),
}


@dataclass(frozen=True)
class Setup:
    """What every rank needs to build the same model and batch."""

    hidden: int
    layers: int
    heads: int
    vocab: int
    seq_length: int
    batch_size: int
    micro_batch_sizes: tuple[int, ...]
    steps: int
    warmup: int
    port: int


@dataclass(frozen=True)
class Row:
    """Medians over the timed rounds of one schedule and micro-batch size, in seconds."""

    schedule: str  # a key of SCHEDULES
    micro_batch_size: int
    micro_batches: int
    ours: float
    theirs: float  # torch's
    ratio: float  # median over rounds of ours / torch within the round (both saw the same noise)
    compute: float  # sum over stages: one core doing all the work
    compute_spread: float  # 90th / 10th percentile of compute over rounds, minus 1: the noise
    ideal: float  # the schedule with free links, from the measured per-micro-batch compute
    stage_compute: tuple[tuple[float, float, float], ...]  # per stage: F, B, W of a step (W 0: in B)
    max_diff: float  # largest loss or gradient difference between ours, torch (and our GPipe)


# -- what one rank runs ---------------------------------------------------------------------------


def build_stage(setup: Setup, topo: Topology, weights: Path | None = None) -> Stage:
    """This rank's stage of the tiny GPT-NeoX ``setup`` describes, with random weights; with
    ``weights`` (a layer-sharded model), that model's config and weights, as the trainer loads them.

    The stages hold equal numbers of layers (the earlier one the odd layer). On these models the
    embedding and the head weigh alike, so that is the split by parameters too; it is pinned,
    and our trainer gets it with --num-layers (``split_flag``), so both sides hold the same
    layers whatever the trainer's default split."""
    if weights is None:
        config = tiny_config("gptneox", setup.vocab, setup.layers, hidden=setup.hidden, heads=setup.heads)
        config._attn_implementation = "sdpa"  # the kernel the trainer uses (modules.load_config)
    else:
        config = load_config(weights)
    family = family_for("gptneox")
    layers = split_layers(config.num_hidden_layers, STAGES)[topo.stage]
    stage = Stage(family, config, layers, topo.is_first_stage, topo.is_last_stage)
    if weights is None:
        # Weights depend on the part names and the seed only, so the stages form one model.
        stage.init_parts(config.initializer_range, SEED)
    else:
        stage.load_parts(str(weights))
    return stage.train()


def split_flag(setup: Setup) -> list[str]:
    """--num-layers for our trainer: the split ``build_stage`` makes."""
    return ["--num-layers", ",".join(str(len(layers)) for layers in split_layers(setup.layers, STAGES))]


def make_batch(setup: Setup) -> torch.Tensor:
    """Random token ids, the same on every rank; they are their own labels (plain LM)."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, setup.vocab, (setup.batch_size, setup.seq_length), generator=generator)


def torch_schedule(
    name: str, stage: Stage, topo: Topology, micro_shape: tuple[int, int], setup: Setup, loss_fn: TokenLoss
) -> _PipelineSchedule:
    """torch's schedule ``name`` over our stage, with shapes given up front (static metadata).

    With inputs and outputs described at construction, the schedule skips its first-step
    shape inference (a real forward/backward plus object sends). The examples live on the
    meta device: only shape, stride, dtype and requires_grad are read. requires_grad matters:
    torch derives which gradients travel from it, so the activation between the stages must
    carry it on both sides, or stage 0 never receives its output gradient.
    """
    meta = torch.device("meta")
    hidden = torch.empty((*micro_shape, setup.hidden), device=meta, requires_grad=True)
    ids = torch.empty(micro_shape, dtype=torch.long, device=meta)
    logits = torch.empty((*micro_shape, setup.vocab), device=meta, requires_grad=True)
    pipe_stage = PipelineStage(
        stage,
        stage_index=topo.stage,
        num_stages=STAGES,
        device=torch.device("cpu"),
        input_args=ids if topo.is_first_stage else hidden,
        output_args=logits if topo.is_last_stage else hidden,
    )
    schedule = SCHEDULES[name][1]
    # The zero-bubble schedule is one of torch's multi-stage ones, which take a list of this
    # rank's stages (here the one); it splits each backward into input and weight parts itself.
    stages = [pipe_stage] if issubclass(schedule, PipelineScheduleMulti) else pipe_stage
    # scale_grads=False: our loss is already divided by the whole batch's token count, so
    # gradients are summed over micro-batches, as our steps do (the default divides by m).
    m = setup.batch_size // micro_shape[0]
    return schedule(stages, n_microbatches=m, loss_fn=loss_fn, scale_grads=False)


def compute_only(
    stage: Stage,
    topo: Topology,
    micro: list[MicroBatch],
    hidden_shape: tuple[int, ...],
    loss_fn: TokenLoss,
    weights: DeferredWeightGrads | None,
) -> tuple[list[float], list[float], list[float]]:
    """Forward then backward of every micro-batch, GPipe order, no communication.

    Returns the seconds of each forward, each backward and, with ``weights`` (the stage's store
    of deferred weight gradients), each backward's W run right after it; without, the backward
    holds W and its seconds are 0. Received activations and gradients are stood in for by random
    tensors of the right shape (compute does not depend on their values).
    """
    generator = torch.Generator().manual_seed(SEED + 1)
    seconds: tuple[list[float], list[float], list[float]] = ([], [], [])
    saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for mb in micro:
        x = mb.input_ids if topo.is_first_stage else torch.randn(hidden_shape, generator=generator).requires_grad_()
        grad = None if topo.is_last_stage else torch.randn(hidden_shape, generator=generator)
        started = time.perf_counter()
        y = stage(x)
        if mb.targets is not None:
            y = loss_fn(y, mb.targets["labels"])
        seconds[0].append(time.perf_counter() - started)
        saved.append((y, grad))
    for y, grad in saved:
        started = time.perf_counter()
        with weights.deferring() if weights is not None else nullcontext():
            torch.autograd.backward(y, grad_tensors=grad)
        seconds[1].append(time.perf_counter() - started)
        if weights is None:
            seconds[2].append(0.0)  # the backward held W
        else:
            started = time.perf_counter()
            weights.run_oldest()
            seconds[2].append(time.perf_counter() - started)
    return seconds


def check_same_work(runs: list[tuple[Callable[[], torch.Tensor], Stage]]) -> float:
    """Largest difference of the later runs' losses and gradients (each of the stage it runs on)
    from the first's, over both ranks."""
    results: list[list[torch.Tensor]] = []  # per run: loss, then every gradient
    for run, stage in runs:
        stage.zero_grad(set_to_none=False)
        results.append([run(), *(p.grad.clone() for p in stage.parameters())])
        stage.zero_grad(set_to_none=False)
    diffs = [(a - b).abs().max() for later in results[1:] for a, b in zip(results[0], later, strict=True)]
    worst = torch.stack(diffs).max().reshape(1)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def timed(run: Callable[[], object], stage: Stage) -> float:
    """Seconds of one step on this rank, from a common start; gradients zeroed afterwards."""
    dist.barrier()  # both ranks start together, so the step time is the slower rank's time
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    stage.zero_grad(set_to_none=False)  # outside the timing: the same cost for every variant
    return elapsed


def measure(setup: Setup, comm: Communicator, stages: tuple[Stage, Stage], name: str, micro_size: int) -> Row | None:
    """Time ours, torch's and compute-only for one schedule and micro-batch size; rank 0 gets the row.
    ``stages``: the plain stage, and its copy whose linear layers defer W, on which our ZB1 runs."""
    topo = comm.topo
    ids = make_batch(setup)
    m = setup.batch_size // micro_size
    hidden_shape = (micro_size, setup.seq_length, setup.hidden)
    # The trainer's loss: summed token cross-entropy over the whole batch's trained tokens.
    normalizer = setup.batch_size * (setup.seq_length - 1)
    loss_fn = functools.partial(token_loss, normalizer=normalizer)
    micro = [
        MicroBatch(ids[i : i + micro_size] if topo.is_first_stage else None,
                   {"labels": ids[i : i + micro_size]} if topo.is_last_stage else None)
        for i in range(0, setup.batch_size, micro_size)
    ]  # fmt: skip
    stage, split_stage = stages
    our_step = SCHEDULES[name][0]
    ours_stage = split_stage if our_step is zero_bubble_step else stage
    weights = deferred_weight_grads(split_stage) if ours_stage is split_stage else None
    schedule = torch_schedule(name, stage, topo, (micro_size, setup.seq_length), setup, loss_fn)

    # As Trainer._run_rounds builds it in fp32: activations travel as the weights' dtype, no autocast.
    spec = StepSpec(
        hidden_shape, torch.float32, lambda y, targets: loss_fn(y, targets["labels"]), train=True, compute_dtype=None
    )

    def run_ours() -> torch.Tensor:
        return our_step(ours_stage, comm, micro, spec)

    def run_torch() -> torch.Tensor:
        # step() cuts the whole batch into the same contiguous micro-batches (dim 0);
        # return_outputs=False spares concatenating the logits, which our steps never do.
        losses: list[torch.Tensor] = []
        args = (ids,) if topo.is_first_stage else ()
        target = ids if topo.is_last_stage else None
        schedule.step(*args, target=target, losses=losses if topo.is_last_stage else None, return_outputs=False)
        return torch.stack(losses).detach().sum() if losses else torch.zeros(())

    compute_times: list[tuple[list[float], list[float], list[float]]] = []  # per round: F, B, W seconds

    def run_compute() -> None:
        # One stage at a time, the other ranks idle in the barrier: each stage's compute is
        # measured alone on its core, as a single rank without communication would run it.
        for s in range(STAGES):
            if s == topo.stage:
                compute_times.append(compute_only(ours_stage, topo, micro, hidden_shape, loss_fn, weights))
                ours_stage.zero_grad(set_to_none=False)
            dist.barrier()

    # The first torch step also runs its warm-up vote between the stages; do it untimed.
    # Every schedule must reproduce our GPipe's loss and gradients (1F1B and ZB1 only reorder the work).
    reference = [] if our_step is gpipe_step else [(functools.partial(gpipe_step, stage, comm, micro, spec), stage)]
    worst = check_same_work([(run_ours, ours_stage), (run_torch, stage), *reference])
    if worst > 1e-5:
        raise RuntimeError(f"{name}: the runs disagree by {worst:.3g} on loss or gradients; timing them means nothing")
    ours: list[float] = []
    theirs: list[float] = []
    for round_index in range(setup.warmup + setup.steps):
        # Alternate who goes first: a slow spell then hits both schedules alike.
        pair = [(ours, run_ours, ours_stage), (theirs, run_torch, stage)]
        for times, run, runs_on in pair if round_index % 2 == 0 else pair[::-1]:
            times.append(timed(run, runs_on))
        run_compute()
    steps = torch.tensor([ours[setup.warmup :], theirs[setup.warmup :]], dtype=torch.float64)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank ends
    compute = torch.zeros((STAGES, setup.steps, 3, m), dtype=torch.float64)  # [stage][round][F, B, W][micro-batch]
    compute[topo.stage] = torch.tensor(compute_times[setup.warmup :], dtype=torch.float64)
    dist.all_reduce(compute)  # every rank's own stage into one table
    if topo.rank != 0:
        return None
    # Compute figures per round (both stages measured in the same round), then their medians.
    per_round = [compute[:, r] for r in range(setup.steps)]
    sums = [float(c.sum()) for c in per_round]
    totals = compute.sum(dim=3).transpose(1, 2).tolist()  # [stage][F, B, W][round]: seconds per step
    stage_compute = tuple((statistics.median(f), statistics.median(b), statistics.median(w)) for f, b, w in totals)
    orders = schedule_orders(our_step, STAGES, m)
    ideal = [simulate(orders, lambda kind, s, i, c=c: float(c[s, "FBW".index(kind), i])).step for c in per_round]
    return Row(
        schedule=name,
        micro_batch_size=micro_size,
        micro_batches=m,
        ours=statistics.median(steps[0].tolist()),
        theirs=statistics.median(steps[1].tolist()),
        ratio=statistics.median((steps[0] / steps[1]).tolist()),
        compute=statistics.median(sums),
        compute_spread=spread(sums),
        ideal=statistics.median(ideal),
        stage_compute=stage_compute,
        max_diff=worst,
    )


def start_rank(rank: int) -> None:
    """What every spawned rank does first: log as the parent does, and take one core and one thread."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("torch.distributed.pipelining").setLevel(logging.WARNING)  # "Using Schedule1F1B"
    os.sched_setaffinity(0, {rank_core(rank)})
    torch.set_num_threads(1)


def worker(rank: int, setup: Setup) -> None:
    """One rank: pin to a core, join the job, measure every schedule and micro-batch size, rank 0 reports."""
    start_rank(rank)
    topo = Topology(rank, pipeline_size=STAGES, data_size=1)
    # Heartbeats are not started: they guard against lost peers, not part of a step's work.
    comm = Communicator.connect(topo, CommConfig(f"tcp://127.0.0.1:{setup.port}", timeout_s=120.0), torch.device("cpu"))
    try:
        stages = (build_stage(setup, topo), build_stage(setup, topo))  # plain, and for our ZB1 (see measure)
        rows = [measure(setup, comm, stages, name, size) for name in SCHEDULES for size in setup.micro_batch_sizes]
    except BaseException as err:
        comm.close(error=f"{type(err).__name__}: {err}")
        raise
    comm.close()
    if rank == 0:
        report(setup, [row for row in rows if row is not None])


def spread(seconds: list[float]) -> float:
    """90th / 10th percentile minus 1: how much timings of the same work vary (inclusive
    percentiles stay within the data, so a handful of timings cannot overstate it)."""
    deciles = statistics.quantiles(seconds, n=10, method="inclusive")
    return deciles[-1] / deciles[0] - 1


def warn_if_noisy(worst_spread: float, what: str) -> None:
    """Warn when the same work varied by more than 10% (``spread``): something else uses the cores."""
    if worst_spread > 0.1:
        log.warning("%s varied by up to %.0f%%: other load on these cores, figures are noisy", what, 100 * worst_spread)


def report(setup: Setup, rows: list[Row]) -> None:
    log.info(
        "tiny GPT-NeoX: hidden %d, %d layers, vocab %d; batch %d x %d tokens; %d stages on %d cores, fp32, Gloo; "
        "median of %d steps after %d warm-up",
        setup.hidden, setup.layers, setup.vocab, setup.batch_size, setup.seq_length, STAGES, STAGES, setup.steps,
        setup.warmup,
    )  # fmt: skip
    header = f"{'schedule':<9} {'micro':>5} {'m':>3} {'ours ms':>8} {'torch ms':>9} {'ours/torch':>10} "
    header += f"{'ideal ms':>9} {'compute ms':>11}"
    log.info("%s", header)
    for row in rows:
        log.info(
            "%-9s %5d %3d %8.1f %9.1f %10.2f %9.1f %11.1f",
            row.schedule, row.micro_batch_size, row.micro_batches, 1e3 * row.ours, 1e3 * row.theirs,
            row.ratio, 1e3 * row.ideal, 1e3 * row.compute,
        )  # fmt: skip
    log.info("ours/torch: median of the per-round ratios (a round times both back to back)")
    log.info("ideal: the schedule with free links from the measured compute; compute: both stages' work, summed")
    for row in rows:
        if row.schedule != next(iter(SCHEDULES)) and not any(w for _, _, w in row.stage_compute):
            continue  # the same work as the first schedule's row at this micro-batch size: shown there
        stages = ", ".join(
            f"stage {s} F {1e3 * f:.1f} + B {1e3 * b:.1f}" + (f" + W {1e3 * w:.1f}" if w else "")
            for s, (f, b, w) in enumerate(row.stage_compute)
        )
        per_stage = [sum(parts) for parts in row.stage_compute]
        log.info(
            "compute per step, %s micro %d (ms): %s; heaviest / lightest stage %.2f",
            row.schedule, row.micro_batch_size, stages, max(per_stage) / min(per_stage),
        )  # fmt: skip
    worst = max(row.max_diff for row in rows)
    agree = "exactly" if worst == 0 else f"within {worst:.1g}"
    log.info("ours and torch (and 1F1B, ZB1 with our GPipe) agree on loss and gradients %s (checked before timing)",
             agree)  # fmt: skip
    warn_if_noisy(max(row.compute_spread for row in rows), "compute-only time between rounds")
    log.info("bubble (idle share of %d cores' step time) vs the closed form:", STAGES)
    log.info("%-9s %5s %3s %7s %7s %7s %7s", "schedule", "micro", "m", "ours", "torch", "ideal", "closed")
    for row in rows:
        bubble = [1 - row.compute / (STAGES * t) for t in (row.ours, row.theirs, row.ideal)]
        # F, B, W summed over the stages: the closed form takes their proportions only
        closed = closed_form_idle(STAGES, row.micro_batches, *map(sum, zip(*row.stage_compute, strict=True)))
        log.info("%-9s %5d %3d %7.2f %7.2f %7.2f %7.2f", row.schedule, row.micro_batch_size, row.micro_batches,
                 *bubble, closed)  # fmt: skip
    log.info(
        "closed: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)(F+B-W)/(m(F+B+W)+(p-1)(F+B-W)) for ZB1 from the measured "
        "F, B, W; it assumes equal stages, and the heavier last stage (head + loss) adds to ideal's bubble"
    )


# -- end to end: our trainer against a bare torch.distributed.pipelining loop ---------------------


@dataclass(frozen=True)
class Case:
    """One schedule of the end-to-end table, and batches of 8 summed per optimizer step."""

    schedule: str  # a key of SCHEDULES; lower-cased, our --pp-mode
    accumulate: int

    @property
    def label(self) -> str:
        return self.schedule if self.accumulate == 1 else f"{self.schedule} accumulate {self.accumulate}"


# The goals: ours' best step time over torch's best, by batches accumulated per step.
TARGETS = {1: 0.90, 4: 0.85}  # ours' best / torch's best, both at 1F1B's memory
BOUNDED_MEMORY = ("1F1B", "ZB1")  # schedules holding at most p - s micro-batches' activations
END_TO_END_LR = 1e-3
MAX_GRAD_NORM = 1.0  # the trainer's default --max-grad-norm
Timings = dict[Case, list[list[float]]]  # per case: per round, the seconds of each timed step


def torch_loop(rank: int, setup: Setup, case: Case, shards: Path, out: Path) -> None:
    """One rank of a bare training loop over torch.distributed.pipelining, as a user would write it:
    schedule steps, clipping by the norm over both stages, AdamW. Rank 0 writes its step times to ``out``."""
    start_rank(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{setup.port}", rank=rank, world_size=STAGES)
    try:
        topo = Topology(rank, pipeline_size=STAGES, data_size=1)
        stage = build_stage(setup, topo, shards)
        # The trainer's loss: the mean over every token trained in the optimizer step.
        normalizer = case.accumulate * setup.batch_size * (setup.seq_length - 1)
        loss_fn = functools.partial(token_loss, normalizer=normalizer)
        schedule = torch_schedule(case.schedule, stage, topo, (1, setup.seq_length), setup, loss_fn)
        # weight_decay=0: the trainer's default --weight-decay (torch's AdamW defaults to 0.01)
        optimizer = torch.optim.AdamW(stage.parameters(), lr=END_TO_END_LR, weight_decay=0.0)
        # Random ids, new for every step; the last stage needs the same ones as targets.
        shape = (setup.steps, case.accumulate, setup.batch_size, setup.seq_length)
        batches = torch.zeros(shape, dtype=torch.long)
        if rank == 0:
            batches = torch.randint(0, setup.vocab, shape, generator=torch.Generator().manual_seed(SEED))
        dist.broadcast(batches, src=0)
        times: list[float] = []
        for step_ids in batches:
            started = time.perf_counter()
            for ids in step_ids:  # gradients add up over schedule steps until zero_grad
                args = (ids,) if topo.is_first_stage else ()
                schedule.step(*args, target=ids if topo.is_last_stage else None, return_outputs=False)
            grads = [p.grad for p in stage.parameters()]
            # Each rank holds one stage: the global norm is the root of the summed squares.
            squared = torch.nn.utils.get_total_norm(grads) ** 2
            dist.all_reduce(squared)
            torch.nn.utils.clip_grads_with_norm_(stage.parameters(), MAX_GRAD_NORM, squared.sqrt())
            optimizer.step()
            times.append(time.perf_counter() - started)
            optimizer.zero_grad()
        if rank == 0:
            out.write_text(json.dumps(times[setup.warmup :]))
    finally:
        dist.destroy_process_group()


def time_torch(setup: Setup, case: Case, shards: Path, out: Path) -> list[float]:
    """Seconds of each timed step of the torch loop (``setup.steps``, the first ``setup.warmup`` not timed)."""
    mp.spawn(torch_loop, args=(replace(setup, port=free_port()), case, shards, out), nprocs=STAGES, join=True)
    return json.loads(out.read_text())


def time_ours(setup: Setup, case: Case, shards: Path, corpus: Path, out: Path, traced: bool = False) -> list[float]:
    """Seconds of each timed step of our trainer (``step_time_s`` of metrics.jsonl); ``traced``
    adds --profiling tidy_profiling (the trace lands in ``out``/trace)."""
    flags = ["--pipeline-group-size", str(STAGES), "--pp-mode", case.schedule.lower(),
             "--gradient-accumulate-step", str(case.accumulate), "--seq-length", str(setup.seq_length),
             "--batch-size", str(setup.batch_size), "--micro-batch-size", "1", "--lr", str(END_TO_END_LR),
             "--max-grad-norm", str(MAX_GRAD_NORM), *split_flag(setup)]  # fmt: skip
    if traced:
        flags += ["--profiling", "tidy_profiling"]
    # Otherwise our defaults, as users run them (--loss-chunk-tokens auto keeps these small logits
    # whole, as the torch loop's plain cross-entropy does).
    rows = run_trainer(shards, corpus, out, setup.steps, flags, pin=True)
    return [row["step_time_s"] for row in rows if "step_time_s" in row][setup.warmup :]


def compute_floor(trace: Path, warmup: int) -> float:
    """Seconds per timed step (those after the first ``warmup``) that no schedule over these
    stages, one per rank, can beat: rank r computes its forwards, backwards and optimizer step on
    its own core, and starts only once micro-batch 0 went through the forwards of every stage
    before it, so the step takes at least max over r of (r's compute + the earlier stages' first
    forwards). Torch's loop computes the same stages, so the floor bounds its ratio to ours too."""
    compute = {LANES.index(lane) for lane in COMPUTE}
    forward = LANES.index("forward compute")
    floor, before = 0.0, 0.0  # before: the earlier stages' first forwards, per step
    for stage in range(STAGES):  # one replica: rank = stage
        events = [e for e in json.loads((trace / f"rank{stage}.json").read_text())["traceEvents"] if e.get("ph") == "X"]
        steps = sorted((e for e in events if e["tid"] == LANES.index("step")), key=lambda e: e["ts"])[warmup:]
        timed = [e for e in events if e["ts"] >= steps[0]["ts"]]
        busy = sum(e["dur"] for e in timed if e["tid"] in compute) / 1e6 / len(steps)
        floor = max(floor, busy + before)
        before += sum(e["dur"] for e in timed if e["tid"] == forward and e["name"] == "F0") / 1e6 / len(steps)
    return floor


def end_to_end(steps: int, warmup: int, rounds: int, accumulations: tuple[int, ...]) -> None:
    """Time whole training steps of our trainer and of the torch loop for every schedule and
    number of accumulated batches, in alternating order round after round, and log the table."""
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    cases = [Case(name, accumulate) for accumulate in accumulations for name in SCHEDULES]
    ours: Timings = {case: [] for case in cases}
    theirs: Timings = {case: [] for case in cases}
    floors: dict[int, list[float]] = {accumulate: [] for accumulate in accumulations}  # per round
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        config = load_config(shards)  # its vocabulary is the tokenizer's
        setup = Setup(
            config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size,
            seq_length=128, batch_size=8, micro_batch_sizes=(1,), steps=steps, warmup=warmup, port=0,
        )  # fmt: skip
        for r in range(rounds):
            for i, case in enumerate(cases):
                # Who goes first alternates (ours, torch, torch, ours, ...): a slow spell hits both alike.
                for side in ("ours", "torch") if r % 2 == 0 else ("torch", "ours"):
                    out = folder / f"{side}-round{r}-case{i}"
                    if side == "ours":
                        ours[case].append(time_ours(setup, case, shards, corpus, out))
                    else:
                        theirs[case].append(time_torch(setup, case, shards, out))
                log.info(
                    "round %d/%d %s: ours %.1f ms, torch %.1f ms", r + 1, rounds, case.label,
                    1e3 * statistics.median(ours[case][-1]), 1e3 * statistics.median(theirs[case][-1]),
                )  # fmt: skip
            for accumulate in accumulations:
                # The floor of this round, from a traced run of our zb1 (its spans give each rank's
                # F, B and W apart), in the same round as the torch runs it is set against
                out = folder / f"traced-round{r}-accumulate{accumulate}"
                time_ours(setup, Case("ZB1", accumulate), shards, corpus, out, traced=True)
                floors[accumulate].append(compute_floor(out / "trace", setup.warmup))
                log.info("round %d/%d accumulate %d: compute floor %.1f ms a step", r + 1, rounds,
                         accumulate, 1e3 * floors[accumulate][-1])  # fmt: skip
    report_end_to_end(setup, rounds, ours, theirs, floors)


def pooled_median(runs: list[list[float]]) -> float:
    """The median over every timed step of every round."""
    return statistics.median(t for run in runs for t in run)


def paired_ratio(runs: list[list[float]], against: list[list[float]]) -> float:
    """Median over rounds of the ratio of the two runs' medians in that round (back to back, so
    both saw the same noise)."""
    return statistics.median(statistics.median(a) / statistics.median(b) for a, b in zip(runs, against, strict=True))


def report_end_to_end(
    setup: Setup, rounds: int, ours: Timings, theirs: Timings, floors: dict[int, list[float]]
) -> None:
    log.info(
        "whole training steps: tiny GPT-NeoX (hidden %d, %d layers, %d heads, vocab %d), batch %d x %d tokens, "
        "micro-batch 1 (m = %d), fp32, AdamW, clipping at %g; %d stages on %d cores, Gloo; %d rounds of %d steps "
        "per run, the first %d not timed",
        setup.hidden, setup.layers, setup.heads, setup.vocab, setup.batch_size, setup.seq_length, setup.batch_size,
        MAX_GRAD_NORM, STAGES, STAGES, rounds, setup.steps, setup.warmup,
    )  # fmt: skip
    log.info("%-12s %-5s %-29s %8s %12s", "batches/step", "side", "schedule", "ms", "/torch best")
    verdicts = []
    for accumulate in sorted({case.accumulate for case in ours}):
        cases = [case for case in ours if case.accumulate == accumulate]
        best_torch = min(cases, key=lambda case: pooled_median(theirs[case]))
        for side, timings in (("ours", ours), ("torch", theirs)):
            for case in cases:
                name = case.schedule if side == "ours" else SCHEDULES[case.schedule][1].__name__
                log.info(
                    "%-12d %-5s %-29s %8.1f %12.2f", accumulate, side, name, 1e3 * pooled_median(timings[case]),
                    paired_ratio(timings[case], theirs[best_torch]),
                )  # fmt: skip
        # The target's terms: the best of each side among the schedules that hold at most p - s
        # micro-batches (1F1B's memory: not GPipe, which holds all m); then the best of any memory.
        bounded = [case for case in cases if case.schedule in BOUNDED_MEMORY]
        comparisons = (("at 1F1B's memory", bounded, TARGETS.get(accumulate)), ("any memory", cases, None))
        for label, pool, target in comparisons:
            mine = min(pool, key=lambda case: pooled_median(ours[case]))
            theirs_best = min(pool, key=lambda case: pooled_median(theirs[case]))
            ratio = paired_ratio(ours[mine], theirs[theirs_best])
            verdict = f", target <= {target:.2f}: {'met' if ratio <= target else 'missed'}" if target else ""
            verdicts.append(
                f"{accumulate} batch(es) per step, {label}: ours' best ({mine.schedule}) / torch's best "
                f"({SCHEDULES[theirs_best.schedule][1].__name__}) {ratio:.2f}{verdict}"
            )
            if target is None:
                continue
            # The floor against the same torch run, round by round: what no schedule can beat here.
            floor = statistics.median(
                f / statistics.median(run) for f, run in zip(floors[accumulate], theirs[theirs_best], strict=True)
            )
            reach = (
                "out of reach of any schedule over these stages"
                if floor > target
                else f"it leaves {target - floor:.2f} for bubbles and overheads"
            )
            verdicts.append(
                f"{accumulate} batch(es) per step: compute floor {1e3 * statistics.median(floors[accumulate]):.0f} ms "
                "(traced zb1: the most, over ranks, of a rank's forwards, backwards and optimizer after the earlier "
                f"stages' first forwards) = {floor:.2f} of torch's best; target {target:.2f}: {reach}"
            )
    log.info("ms: median over every timed step; /torch best: median over rounds of the runs' median ratio to the")
    log.info("torch schedule with the lowest ms at the same batches per step (run back to back with it)")
    log.info("ours: step_time_s of the trainer; torch: its schedule (once per batch) + clipping + AdamW, on rank 0")
    for verdict in verdicts:
        log.info("%s", verdict)
    runs = [run for side in (ours, theirs) for case_runs in side.values() for run in case_runs]
    warn_if_noisy(max(spread(run) for run in runs), "step time within a run")


# -- entry point ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--layers", type=int, default=8, help="transformer layers, split over the 2 stages")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--seq-length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--micro-batch-sizes", default="1,2", help="comma-separated micro-batch sizes to compare")
    parser.add_argument(
        "--steps", type=int, default=None,
        help="timed steps per schedule, the median is reported (default 30); with --end-to-end, steps per "
        "training run, the first --warmup of them not timed (default 12)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per schedule first (default 3; 2)")
    parser.add_argument(
        "--end-to-end", action="store_true",
        help="whole training steps instead: our trainer (dist_clm_train.py) against a bare loop over "
        "torch.distributed.pipelining with clipping and AdamW, on bench/common.py's model (4 layers, hidden 256, "
        "8 heads), seq 128, batch 8 of micro-batch 1; the model flags above do not apply",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="with --end-to-end: rounds of every case")
    parser.add_argument(
        "--accumulate", default="1,4", help="with --end-to-end: batches of 8 summed per optimizer step, comma-separated"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(os.sched_getaffinity(0)) < STAGES:
        log.warning("fewer than %d cores available: the ranks will share one and the figures mean little", STAGES)
    os.environ["OMP_NUM_THREADS"] = "1"  # the ranks (and the trainer's) start with one compute thread each
    if args.end_to_end:
        steps = 12 if args.steps is None else args.steps
        warmup = 2 if args.warmup is None else args.warmup
        if warmup < 0 or steps - warmup < 2 or args.rounds < 1:
            parser.error("--end-to-end needs at least 2 timed steps (--steps minus --warmup) and 1 round")
        accumulations = tuple(int(a) for a in args.accumulate.split(","))
        if any(a < 1 for a in accumulations):
            parser.error("--accumulate takes positive counts")
        end_to_end(steps, warmup, args.rounds, accumulations)
        return
    args.steps = 30 if args.steps is None else args.steps
    args.warmup = 3 if args.warmup is None else args.warmup
    sizes = tuple(int(s) for s in args.micro_batch_sizes.split(","))
    if args.steps < 2 or args.warmup < 0:
        parser.error("--steps must be at least 2 (medians and spreads need them) and --warmup at least 0")
    if any(size < 1 or args.batch_size % size for size in sizes):
        parser.error(f"every micro-batch size must divide --batch-size {args.batch_size}")
    for m in (args.batch_size // size for size in sizes):
        # Schedule1F1B wants m >= p; ScheduleInterleavedZeroBubble runs m in rounds of max(1, m // p).
        if m < STAGES or m % max(1, m // STAGES):
            parser.error(f"m = {m} micro-batches: torch's 1F1B needs m >= {STAGES}, its zero-bubble schedule m a "
                         f"multiple of m // {STAGES}")  # fmt: skip
    setup = Setup(
        args.hidden, args.layers, args.heads, args.vocab, args.seq_length, args.batch_size, sizes,
        args.steps, args.warmup, free_port(),
    )  # fmt: skip
    mp.spawn(worker, args=(setup,), nprocs=STAGES, join=True)


if __name__ == "__main__":
    main()
