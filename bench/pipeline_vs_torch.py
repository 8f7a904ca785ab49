"""Our GPipe and 1F1B steps next to torch.distributed.pipelining's ScheduleGPipe and Schedule1F1B.

    python bench/pipeline_vs_torch.py [--micro-batch-sizes 1,2] [--steps 30] [--seq-length 32]

Starts 2 ranks itself (Gloo on CPU, each pinned to its own core with one thread). Both ranks
build the same tiny GPT-NeoX (convert.tiny_model.tiny_config, random weights from a seed) and
hold one ``Stage`` each: stage 0 = embedding + first layers, stage 1 = the rest + head, split as
the trainer splits them. For every schedule (GPipe, 1F1B) and micro-batch size, each round runs,
on the same stage objects and the same batch, with gradients zeroed after each (outside the timing):

  ours     pipeline.schedule.gpipe_step / one_f_one_b_step over Communicator.connect, as
           trainer/loop.py calls them
  torch    torch.distributed.pipelining: PipelineStage (wrapping the same Stage) + ScheduleGPipe /
           Schedule1F1B
  compute  each stage's forwards and backwards alone on its core, one stage at a time, no links

Rounds alternate the order of ours and torch so both see the same noise; the table gives
medians over rounds, and ours/torch is the median of the per-round ratios. "compute" is the
sum over stages (the work one core would do alone); "ideal" is the step of the schedule that the
measured per-micro-batch compute allows when links cost nothing: the limit ours and torch chase.
Before timing, ours and torch (and for 1F1B, our GPipe) must give the same loss and gradients, so
they are timed doing the same work. Other processes on the same cores show up as a warning about noisy figures.

    python bench/pipeline_vs_torch.py --end-to-end [--rounds 3] [--steps 12] [--warmup 2]

times whole training steps instead, on bench/common.py's model (4 layers, hidden 256, 8 heads), seq 128,
batch 8 in micro-batches of 1, fp32, for GPipe, 1F1B and 1F1B accumulating 4 batches per step:

  ours     dist_clm_train.py (2 ranks, each under taskset on its own core): step_time_s of metrics.jsonl
  torch    a bare loop as a user would write it: PipelineStage + ScheduleGPipe / Schedule1F1B (called once
           per accumulated batch), clipping by the norm over both stages (an all_reduce of its square),
           AdamW, timed on rank 0

Each run trains --steps steps and times all but the first --warmup; rounds alternate who runs first.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from bench.common import ROOT, build_model, rank_core
from bench.common import run as run_trainer
from comm.process_group import CommConfig, Communicator
from comm.topology import Topology
from convert.tiny_model import tiny_config
from modules import family_for, load_config
from pipeline.partition import split_layers
from pipeline.schedule import LossFn, MicroBatch, StepSpec, gpipe_step, one_f_one_b_step
from pipeline.stage import Stage
from trainer.loss import token_loss
from trainer.startup import part_sizes

log = logging.getLogger("bench.pipeline_vs_torch")
STAGES = 2  # one stage per rank, one rank per core
SEED = 0
# Table name -> (our step, torch's schedule class): the same schedule on both sides.
SCHEDULES = {"GPipe": (gpipe_step, ScheduleGPipe), "1F1B": (one_f_one_b_step, Schedule1F1B)}


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
    stage_compute: tuple[tuple[float, float], ...]  # per stage: forwards, backwards of a step
    max_diff: float  # largest loss or gradient difference between ours, torch (and our GPipe)


# -- what one rank runs ---------------------------------------------------------------------------


def build_stage(setup: Setup, topo: Topology, weights: Path | None = None) -> Stage:
    """This rank's stage of the tiny GPT-NeoX ``setup`` describes, with random weights; with
    ``weights`` (a layer-sharded model), that model's config and weights, as the trainer loads them."""
    if weights is None:
        config = tiny_config("gptneox", setup.vocab, setup.layers, hidden=setup.hidden, heads=setup.heads)
        config._attn_implementation = "sdpa"  # the kernel the trainer uses (modules.load_config)
    else:
        config = load_config(weights)
    family = family_for("gptneox")
    # The trainer's split: balance parameters, counting the embedding and the head.
    embedding, layer, head = part_sizes(family, config)
    layers = split_layers(config.num_hidden_layers, STAGES, layer_cost=layer, first_extra=embedding, last_extra=head)
    stage = Stage(family, config, layers[topo.stage], topo.is_first_stage, topo.is_last_stage)
    if weights is None:
        # Weights depend on the part names and the seed only, so the stages form one model.
        stage.init_parts(config.initializer_range, SEED)
    else:
        stage.load_parts(str(weights))
    return stage.train()


def make_batch(setup: Setup) -> torch.Tensor:
    """Random token ids, the same on every rank; they are their own labels (plain LM)."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, setup.vocab, (setup.batch_size, setup.seq_length), generator=generator)


def torch_schedule(
    name: str, stage: Stage, topo: Topology, micro_shape: tuple[int, int], setup: Setup, loss_fn: LossFn
) -> ScheduleGPipe | Schedule1F1B:
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
    # scale_grads=False: our loss is already divided by the whole batch's token count, so
    # gradients are summed over micro-batches, as our steps do (the default divides by m).
    return SCHEDULES[name][1](pipe_stage, n_microbatches=setup.batch_size // micro_shape[0], loss_fn=loss_fn,
                              scale_grads=False)  # fmt: skip


def compute_only(
    stage: Stage, topo: Topology, micro: list[MicroBatch], hidden_shape: tuple[int, ...], loss_fn: LossFn
) -> tuple[list[float], list[float]]:
    """Forward then backward of every micro-batch, GPipe order, no communication.

    Returns the seconds of each forward and each backward. Received activations and
    gradients are stood in for by random tensors of the right shape (compute does not
    depend on their values).
    """
    generator = torch.Generator().manual_seed(SEED + 1)
    fwd: list[float] = []
    bwd: list[float] = []
    saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for mb in micro:
        x = mb.input_ids if topo.is_first_stage else torch.randn(hidden_shape, generator=generator).requires_grad_()
        grad = None if topo.is_last_stage else torch.randn(hidden_shape, generator=generator)
        started = time.perf_counter()
        y = stage(x)
        if mb.labels is not None:
            y = loss_fn(y, mb.labels)
        fwd.append(time.perf_counter() - started)
        saved.append((y, grad))
    for y, grad in saved:
        started = time.perf_counter()
        torch.autograd.backward(y, grad_tensors=grad)
        bwd.append(time.perf_counter() - started)
    return fwd, bwd


def check_same_work(stage: Stage, topo: Topology, runs: list[Callable[[], torch.Tensor]]) -> float:
    """Largest difference of the later runs' losses and gradients from the first's, over both ranks."""
    results: list[list[torch.Tensor]] = []  # per run: loss, then every gradient
    for run in runs:
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


def stage_order(schedule: str, stage: int, m: int) -> list[tuple[str, int]]:
    """The order in which ``stage`` runs forwards ("F", i) and backwards ("B", i) under ``schedule``."""
    if schedule == "GPipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(STAGES - 1 - stage, m)  # 1F1B: warm-up forwards, then one forward, one backward
    order = [("F", i) for i in range(warmup)]
    for i in range(warmup, m):
        order += [("F", i), ("B", i - warmup)]
    return order + [("B", i) for i in range(m - warmup, m)]


def ideal_step(schedule: str, fwd: list[list[float]], bwd: list[list[float]]) -> float:
    """End of a step whose links are free: fwd[s][i] / bwd[s][i] are the compute seconds of
    micro-batch i on stage s; each runs in its stage's order, after the one before it and after
    the neighbouring stage's output (forward: from s-1, backward: from s+1)."""
    orders = [stage_order(schedule, s, len(fwd[0])) for s in range(len(fwd))]  # what is left to run
    clock = [0.0] * len(fwd)  # when each stage's latest op ended
    end: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> when it ended
    while any(orders):
        for s, order in enumerate(orders):  # run each stage as far as its inputs allow
            while order:
                kind, i = order[0]
                source = (kind, s - 1 if kind == "F" else s + 1, i)
                if 0 <= source[1] < len(fwd) and source not in end:
                    break  # waits for the neighbour's output
                order.pop(0)
                clock[s] = max(clock[s], end.get(source, 0.0)) + (fwd if kind == "F" else bwd)[s][i]
                end[kind, s, i] = clock[s]
    return max(clock)


def measure(setup: Setup, comm: Communicator, stage: Stage, name: str, micro_size: int) -> Row | None:
    """Time ours, torch's and compute-only for one schedule and micro-batch size; rank 0 gets the row."""
    topo = comm.topo
    ids = make_batch(setup)
    m = setup.batch_size // micro_size
    hidden_shape = (micro_size, setup.seq_length, setup.hidden)
    # The trainer's loss: summed token cross-entropy over the whole batch's trained tokens.
    normalizer = setup.batch_size * (setup.seq_length - 1)
    loss_fn = functools.partial(token_loss, normalizer=normalizer)
    micro = [
        MicroBatch(ids[i : i + micro_size] if topo.is_first_stage else None,
                   ids[i : i + micro_size] if topo.is_last_stage else None)
        for i in range(0, setup.batch_size, micro_size)
    ]  # fmt: skip
    our_step = SCHEDULES[name][0]
    schedule = torch_schedule(name, stage, topo, (micro_size, setup.seq_length), setup, loss_fn)

    # As Trainer._run_rounds builds it in fp32: activations travel as the weights' dtype, no autocast.
    spec = StepSpec(hidden_shape, torch.float32, loss_fn, train=True, compute_dtype=None)

    def run_ours() -> torch.Tensor:
        return our_step(stage, comm, micro, spec)

    def run_torch() -> torch.Tensor:
        # step() cuts the whole batch into the same contiguous micro-batches (dim 0);
        # return_outputs=False spares concatenating the logits, which our steps never do.
        losses: list[torch.Tensor] = []
        args = (ids,) if topo.is_first_stage else ()
        target = ids if topo.is_last_stage else None
        schedule.step(*args, target=target, losses=losses if topo.is_last_stage else None, return_outputs=False)
        return torch.stack(losses).detach().sum() if losses else torch.zeros(())

    fwd_times: list[list[float]] = []
    bwd_times: list[list[float]] = []

    def run_compute() -> None:
        # One stage at a time, the other ranks idle in the barrier: each stage's compute is
        # measured alone on its core, as a single rank without communication would run it.
        for s in range(STAGES):
            if s == topo.stage:
                fwd, bwd = compute_only(stage, topo, micro, hidden_shape, loss_fn)
                fwd_times.append(fwd)
                bwd_times.append(bwd)
                stage.zero_grad(set_to_none=False)
            dist.barrier()

    # The first torch step also runs its warm-up vote between the stages; do it untimed.
    # Every schedule must reproduce our GPipe's loss and gradients (1F1B only reorders the work).
    reference = [] if our_step is gpipe_step else [functools.partial(gpipe_step, stage, comm, micro, spec)]
    worst = check_same_work(stage, topo, [run_ours, run_torch, *reference])
    if worst > 1e-5:
        raise RuntimeError(f"{name}: the runs disagree by {worst:.3g} on loss or gradients; timing them means nothing")
    ours: list[float] = []
    theirs: list[float] = []
    for round_index in range(setup.warmup + setup.steps):
        # Alternate who goes first: a slow spell then hits both schedules alike.
        pair = [(ours, run_ours), (theirs, run_torch)]
        for times, run in pair if round_index % 2 == 0 else pair[::-1]:
            times.append(timed(run, stage))
        run_compute()
    del fwd_times[: setup.warmup], bwd_times[: setup.warmup]
    steps = torch.tensor([ours[setup.warmup :], theirs[setup.warmup :]], dtype=torch.float64)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank ends
    compute = torch.zeros((STAGES, 2, setup.steps, m), dtype=torch.float64)
    compute[topo.stage] = torch.tensor([fwd_times, bwd_times], dtype=torch.float64)
    dist.all_reduce(compute)  # every rank's own stage into one table
    if topo.rank != 0:
        return None
    # Compute figures per round (both stages measured in the same round), then their medians.
    per_round = [compute[:, :, r] for r in range(setup.steps)]
    sums = [float(c.sum()) for c in per_round]
    totals = compute.sum(dim=3).tolist()  # [stage][forward, backward][round]: seconds per step
    stage_compute = tuple((statistics.median(f), statistics.median(b)) for f, b in totals)
    return Row(
        schedule=name,
        micro_batch_size=micro_size,
        micro_batches=m,
        ours=statistics.median(steps[0].tolist()),
        theirs=statistics.median(steps[1].tolist()),
        ratio=statistics.median((steps[0] / steps[1]).tolist()),
        compute=statistics.median(sums),
        compute_spread=spread(sums),
        ideal=statistics.median(ideal_step(name, c[:, 0].tolist(), c[:, 1].tolist()) for c in per_round),
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
        stage = build_stage(setup, topo)
        rows = [measure(setup, comm, stage, name, size) for name in SCHEDULES for size in setup.micro_batch_sizes]
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
    for row in rows[: len(setup.micro_batch_sizes)]:  # the same work under every schedule: show it once
        stages = ", ".join(f"stage {s} F {1e3 * f:.1f} + B {1e3 * b:.1f}" for s, (f, b) in enumerate(row.stage_compute))
        per_stage = [f + b for f, b in row.stage_compute]
        log.info(
            "compute per step, micro %d (ms): %s; heaviest / lightest stage %.2f",
            row.micro_batch_size, stages, max(per_stage) / min(per_stage),
        )  # fmt: skip
    worst = max(row.max_diff for row in rows)
    agree = "exactly" if worst == 0 else f"within {worst:.1g}"
    log.info("ours and torch (and 1F1B with our GPipe) agree on loss and gradients %s (checked before timing)", agree)
    warn_if_noisy(max(row.compute_spread for row in rows), "compute-only time between rounds")
    log.info("bubble (idle share of %d cores' step time) vs (p-1)/(m+p-1):", STAGES)
    log.info("%-9s %5s %3s %7s %7s %7s %7s", "schedule", "micro", "m", "ours", "torch", "ideal", "theory")
    for row in rows:
        bubble = [1 - row.compute / (STAGES * t) for t in (row.ours, row.theirs, row.ideal)]
        theory = (STAGES - 1) / (row.micro_batches + STAGES - 1)
        log.info("%-9s %5d %3d %7.2f %7.2f %7.2f %7.2f", row.schedule, row.micro_batch_size, row.micro_batches,
                 *bubble, theory)  # fmt: skip
    log.info("theory assumes equal stages; the heavier last stage (head + loss) adds to ideal's bubble")


# -- end to end: our trainer against a bare torch.distributed.pipelining loop ---------------------


@dataclass(frozen=True)
class Case:
    """One line of the end-to-end table: a schedule, and batches of 8 summed per optimizer step."""

    schedule: str  # a key of SCHEDULES; lower-cased, our --pp-mode
    accumulate: int

    @property
    def label(self) -> str:
        return self.schedule if self.accumulate == 1 else f"{self.schedule} accumulate {self.accumulate}"


CASES = (Case("GPipe", 1), Case("1F1B", 1), Case("1F1B", 4))
END_TO_END_LR = 1e-3
MAX_GRAD_NORM = 1.0  # the trainer's default --max-grad-norm


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


def time_ours(setup: Setup, case: Case, shards: Path, corpus: Path, out: Path) -> list[float]:
    """Seconds of each timed step of our trainer (``step_time_s`` of metrics.jsonl)."""
    flags = ["--pipeline-group-size", str(STAGES), "--pp-mode", case.schedule.lower(),
             "--gradient-accumulate-step", str(case.accumulate), "--seq-length", str(setup.seq_length),
             "--batch-size", str(setup.batch_size), "--micro-batch-size", "1", "--lr", str(END_TO_END_LR),
             "--max-grad-norm", str(MAX_GRAD_NORM)]  # fmt: skip
    # Otherwise our defaults, as users run them: the chunked loss projects the logits again in
    # the backward, work the torch loop (whole logits, plain cross-entropy) does not do.
    rows = run_trainer(shards, corpus, out, setup.steps, flags, pin=True)
    return [row["step_time_s"] for row in rows if "step_time_s" in row][setup.warmup :]


def end_to_end(steps: int, warmup: int, rounds: int) -> None:
    """Time whole training steps of our trainer and of the torch loop for every case, in
    alternating order round after round, and log the table."""
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    ours: dict[Case, list[list[float]]] = {case: [] for case in CASES}  # per case: per round, step seconds
    theirs: dict[Case, list[list[float]]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        config = load_config(shards)  # its vocabulary is the tokenizer's
        setup = Setup(
            config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size,
            seq_length=128, batch_size=8, micro_batch_sizes=(1,), steps=steps, warmup=warmup, port=0,
        )  # fmt: skip
        for r in range(rounds):
            for i, case in enumerate(CASES):
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
    report_end_to_end(setup, rounds, ours, theirs)


def report_end_to_end(
    setup: Setup, rounds: int, ours: dict[Case, list[list[float]]], theirs: dict[Case, list[list[float]]]
) -> None:
    log.info(
        "whole training steps: tiny GPT-NeoX (hidden %d, %d layers, %d heads, vocab %d), batch %d x %d tokens, "
        "micro-batch 1, fp32, AdamW, clipping at %g; %d stages on %d cores, Gloo; %d rounds of %d steps per run, "
        "the first %d not timed",
        setup.hidden, setup.layers, setup.heads, setup.vocab, setup.batch_size, setup.seq_length, MAX_GRAD_NORM,
        STAGES, STAGES, rounds, setup.steps, setup.warmup,
    )  # fmt: skip
    log.info("%-18s %8s %9s %10s", "case", "ours ms", "torch ms", "ours/torch")
    for case in CASES:
        pooled = [statistics.median(t for run in side[case] for t in run) for side in (ours, theirs)]
        ratio = statistics.median(
            statistics.median(a) / statistics.median(b) for a, b in zip(ours[case], theirs[case], strict=True)
        )
        log.info("%-18s %8.1f %9.1f %10.2f", case.label, 1e3 * pooled[0], 1e3 * pooled[1], ratio)
    log.info("ms: median over every timed step; ours/torch: median over rounds of the runs' median ratio")
    log.info("ours: step_time_s of the trainer; torch: ScheduleGPipe/Schedule1F1B + clipping + AdamW, on rank 0")
    runs = [run for side in (ours, theirs) for case in CASES for run in side[case]]
    warn_if_noisy(max(spread(run) for run in runs), "step time within a run")


# -- entry point ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        end_to_end(steps, warmup, args.rounds)
        return
    args.steps = 30 if args.steps is None else args.steps
    args.warmup = 3 if args.warmup is None else args.warmup
    sizes = tuple(int(s) for s in args.micro_batch_sizes.split(","))
    if args.steps < 2 or args.warmup < 0:
        parser.error("--steps must be at least 2 (medians and spreads need them) and --warmup at least 0")
    if any(size < 1 or args.batch_size % size for size in sizes):
        parser.error(f"every micro-batch size must divide --batch-size {args.batch_size}")
    setup = Setup(
        args.hidden, args.layers, args.heads, args.vocab, args.seq_length, args.batch_size, sizes,
        args.steps, args.warmup, free_port(),
    )  # fmt: skip
    mp.spawn(worker, args=(setup,), nprocs=STAGES, join=True)


if __name__ == "__main__":
    main()
