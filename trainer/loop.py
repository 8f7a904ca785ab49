"""A rank's training: its stage, optimizer, data and state, and what one step, one evaluation or
one checkpoint does (when each runs, and what a lost peer or a notice changes, is run.supervisor;
how a process enters a run, run.entry)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace

import torch

from comm.process_group import Communicator, ReplicaLostError
from comm.topology import Topology
from data.stream import Batch, TaskSpec, TokenStream, parse_task_names
from data_parallel.base import Trained
from data_parallel.choose import make_sync
from modules.layout import checkpoint_dir, latest_step
from objectives import Objective, RunContext, StepLoss, Targets, make_objective
from observability.metrics import ONCE, PER_STAGE, NamedTotals, PipelineSums
from pipeline.schedule import SCHEDULES, GradientWatch, LossFn, MicroBatch, RouterLoss, StepSpec
from pipeline.stage import Stage
from pipeline.tied import TiedCopy
from trainer.checkpoint import TRAINER_STATE, Disks, load_checkpoint, save_checkpoint
from trainer.config import RunConfig
from trainer.identity import RunIdentity, check_resume, schedule_of
from trainer.memory import MemoryEstimate, PeakMemory, probe_micro_batch, resident_bytes
from trainer.optimizer import StageOptimizer, decayed_names
from trainer.precision import MASTER_DTYPE, LossScaler, compute_dtype
from trainer.startup import Plan
from trainer.state import ReplicasChanged, TrainState

log = logging.getLogger(__name__)
# logged beside an evaluation's loss
EVAL_SHOWN = ("perplexity", "rewards/accuracies", "rewards/margins", "accuracy", "margin")


class Trainer:
    """A rank's training: its stage, optimizer, data and state, one step (or evaluation, or
    checkpoint) at a time; run.supervisor decides which, and when."""

    def __init__(self, cfg: RunConfig, plan: Plan, comm: Communicator | None, disks: Disks | None) -> None:
        """``comm`` and ``disks`` are None for a rank joining a live elastic run, which sets up
        first and gets them when the run takes it in (``use``)."""
        self.cfg = cfg
        self.disks = disks  # who shares this rank's checkpoint folder
        self.plan = plan
        self.comm = comm
        self.device = torch.device(cfg.device)
        self.has_data = self.topo.is_first_stage or self.topo.is_last_stage
        # a step's global batch in slots of --batch-size sequences, replica r training every
        # data_size-th slot from r: with the launch's replicas, round a's r-th slice as always;
        # with fewer (an elastic run that lost some) the same sequences over fewer pipelines
        self.slots_per_step = cfg.global_batch_sequences // cfg.batch.batch_size
        # what it carries from step to step besides its tensors (trainer.state)
        self.state = TrainState(packing=cfg.data.packing or ("none" if cfg.objective.pairs else "documents"))
        self.stage: Stage | None = None
        self.tokenizer = None
        self.pad_id = 0  # the token sequences are padded with (the first and last stages read it in setup)
        self.stream: TokenStream | None = None
        self.objective: Objective = make_objective(cfg.objective)  # what the last stage trains for (objectives/)
        self.optimizer: StageOptimizer | None = None
        self._dp_bytes_reported = 0
        self.memory = PeakMemory(self.device)
        self.estimate: MemoryEstimate | None = None  # of this stage's peak, made in setup
        self.loss_chunk = 0  # tokens the loss projects at a time (0: all logits), set in setup
        # the step of the last checkpoint every rank committed in this process (or resumed from):
        # the same on every rank, unlike the folder's ``latest``, which its owner moves last
        self.committed_step: int | None = None

    @property
    def topo(self) -> Topology:
        """This rank's place: its communicator's (an elastic run's changes as replicas come and go)."""
        return self.comm.topo if self.comm is not None else self.cfg.topology

    @property
    def is_reporter(self) -> bool:
        """The rank that writes metrics: the last stage of the first replica."""
        return self.topo.rank == self.topo.rank_of(self.topo.pipeline_size - 1, 0)

    def setup(self, joining: bool = False) -> None:
        """Build and load this rank's stage, optimizer and data stream (may raise). A rank
        ``joining`` a live run reads no checkpoint: a live replica hands it the run's state."""
        cfg, topo = self.cfg, self.topo
        process = resident_bytes() if self.device.type == "cpu" else 0  # CUDA's peak counts tensors only
        recompute = cfg.activation_checkpointing == "full"
        self.stage = Stage(
            self.plan.family, self.plan.model_config, self.plan.layers, topo.is_first_stage, topo.is_last_stage,
            recompute, self.device, **self.objective.stage_options(),
        )  # fmt: skip
        std = getattr(self.plan.model_config, "initializer_range", 0.02)
        if cfg.model.load_pretrained:
            self.stage.load_parts(cfg.model.model_name, std=std, seed=cfg.data.seed)
        else:
            self.stage.init_parts(std, cfg.data.seed)
        if cfg.lora is not None:
            frozen = compute_dtype(cfg.optim.precision)  # frozen linear weights need no fp32 master copy
            spec = self.stage.add_lora(cfg.lora, cfg.data.seed, frozen)
            log.info("LoRA rank %d alpha %g dropout %g on %s; frozen block weights in %s", spec.rank, spec.alpha,
                     spec.dropout, " ".join(spec.target_modules), cfg.optim.precision, extra=ONCE)  # fmt: skip
        self.loss_chunk = cfg.chunk_tokens_for(self.plan.model_config.vocab_size)
        # the loss reads the logits, or the final norm's output (chunked, or a head of the objective's)
        self.stage.project_logits = self.loss_chunk == 0 and self.objective.reads_logits
        # before any checkpoint loads: the stage holds the starting weights (DPO's reference)
        self.objective.start(self.stage, self._forward_only, self._run_context())
        self.stage.to(self.device).train()
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.tied = TiedCopy(self.stage)  # this stage's copy of a tied embedding and head, if any (pipeline.tied)
        self.trainable = sum(p.numel() for p in self.tied.counted(self.params))
        log.info("%d trainable of %d parameters on this stage", sum(p.numel() for p in self.params),
                 sum(p.numel() for p in self.stage.parameters()), extra=PER_STAGE)  # fmt: skip
        decayed = decayed_names(self.stage)  # HF Trainer's rule: no decay on biases and norm weights
        named = [name for name, p in self.stage.named_parameters() if p.requires_grad]
        indices = frozenset(i for i, name in enumerate(named) if name in decayed)
        trained = Trained(self.params, self.tied.param, self.tied.norm_skip(self.params), indices)
        sync = make_sync(cfg.dp, trained, self.comm, self.device, self.stage,
                         self.plan.model_config.num_hidden_layers, cfg.optim.total_steps)  # fmt: skip
        self.optimizer = StageOptimizer(cfg.optim, sync)
        self.estimate = self._estimate_memory(process)
        log.info("memory estimate: %s (peak_mem_bytes in metrics.jsonl is the measure)", self.estimate.describe(),
                 extra=PER_STAGE)  # fmt: skip
        self.state.scaler = LossScaler(cfg.optim.loss_scale) if cfg.optim.precision == "fp16" else None
        if self.has_data:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name)
            # a new stream packs as asked (None: the default), a resumed one as it recorded
            self.stream = self._stream(cfg.data.tasks, "none" if cfg.objective.pairs else cfg.data.packing)
            self.pad_id = self.stream.pad_id
            self.state.data = self.stream.state_dict()
        # what makes this run this run (trainer.identity), recorded in each of its checkpoints
        self.identity = RunIdentity.of(cfg)
        if joining:
            return
        if not cfg.checkpoint.resume and latest_step(cfg.checkpoint.path) is not None:
            raise ValueError(
                f"{cfg.checkpoint.path} already holds checkpoints and --load-checkpoint is false; "
                "resume with --load-checkpoint true or choose a new --checkpoint-path (nothing was overwritten)"
            )
        resumed, latest = None, latest_step(cfg.checkpoint.path) if cfg.checkpoint.resume else None
        if latest is not None:
            # another run's checkpoints are refused before any of their weights is read (every
            # rank reads the same file, which agree_on_resume has put in each rank's folder)
            recorded = checkpoint_dir(cfg.checkpoint.path, latest) / TRAINER_STATE
            if recorded.is_file():  # else load_checkpoint says what is wrong with the checkpoint
                check_resume(cfg, json.loads(recorded.read_text()), latest, self.identity)
            resumed = load_checkpoint(
                cfg.checkpoint.path, self.stage, self.optimizer, cfg.model.model_name, topo.replica
            )
        if resumed is not None:
            step, state = resumed
            self.load_state({**state, "step": step})
            self.committed_step = step
            log.info("resumed from step %d of %s", step, cfg.checkpoint.path)

    # -- one pass of the pipeline over some rounds of a global batch ----------------------------

    def _slots(self, total: int) -> range:
        """This replica's slots of a batch of ``total`` slots (``slots_per_step``)."""
        return range(self.topo.replica, total, self.topo.data_size)

    def _rows(self, slot: int) -> slice:
        size = self.cfg.batch.batch_size
        return slice(slot * size, (slot + 1) * size)

    def _stream(self, tasks: tuple[TaskSpec, ...], packing: str | None) -> TokenStream:
        data = self.cfg.data
        return TokenStream(tasks, self.tokenizer, data.seq_length, data.seed, data.skip_bad_lines, data.chat_template,
                           packing, pairs=self.cfg.objective.pairs, truncation=data.pair_truncation)  # fmt: skip

    def _micro_batches(self, batch: Batch | None, slot: int, first_file: int = 0) -> list[MicroBatch]:
        """This replica's micro-batches of slot ``slot``: the first stage's carry the tokens, the
        last stage's the objective's targets (``first_file``: the batch's tasks' place among all
        the run's files, where DPO's reference table finds its pairs)."""
        cfg, topo = self.cfg, self.topo
        m, size = cfg.batch.micro_batch_size, cfg.batch.batch_size
        if batch is None:
            return [MicroBatch(None, None)] * cfg.batch.micro_batches
        first, last = topo.is_first_stage, topo.is_last_stage
        rows = self._rows(slot)
        ids = self._to_device(batch.input_ids[rows]) if first else None
        travel = first and self.state.packing != "concat"  # concat: every stage counts 0..seq-1 itself
        positions = self._to_device(batch.positions()[rows]) if travel else None
        targets: Targets | None = None
        if last:
            made = self.objective.targets(batch, rows, slot, first_file, self.pad_id)
            targets = {name: self._to_device(value) for name, value in made.items()}
        micro = [slice(i, i + m) for i in range(0, size, m)]
        return [
            MicroBatch(ids[r] if first else None, {k: v[r] for k, v in targets.items()} if last else None,
                       positions[r] if travel else None)
            for r in micro
        ]  # fmt: skip

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch slice on the compute device; from pinned memory (the prefetcher pins batches
        for CUDA) the copy is asynchronous and the step's first kernels queue behind it."""
        return tensor.to(self.device, non_blocking=tensor.is_pinned())

    def _step_loss(self, normalizer: float) -> StepLoss:
        """A fresh loss of the objective for one step or evaluation, over ``normalizer``."""
        return self.objective.step_loss(self.stage, normalizer, self.loss_chunk, self.device)

    def _run_context(self) -> RunContext:
        """What of the run the objective may need (DPO's reference)."""
        cfg = self.cfg
        evaluation = parse_task_names(str(cfg.evaluation.path)) if cfg.evaluation.path is not None else ()
        return RunContext(
            lora=cfg.lora is not None, batch_size=cfg.batch.batch_size, launched=cfg.topology.data_size,
            folder=cfg.checkpoint.path, seq_length=cfg.data.seq_length, truncation=cfg.data.pair_truncation,
            files=(*cfg.data.tasks, *evaluation), chunk=self.loss_chunk, device=cfg.device,
        )  # fmt: skip

    def _activation_shape(self) -> tuple[int, int, int]:
        cfg = self.cfg
        return cfg.batch.micro_batch_size, cfg.data.seq_length, self.plan.model_config.hidden_size

    def _estimate_memory(self, process: int) -> MemoryEstimate:
        """The start-up estimate of this stage's peak: what it holds, and one micro-batch's
        forward probed on random input (its dropout draws are reseeded by the first step)."""
        cfg, topo, stage = self.cfg, self.topo, self.stage
        shape, vocab = self._activation_shape(), self.plan.model_config.vocab_size
        if topo.is_first_stage:
            x = torch.randint(vocab, shape[:2], device=self.device)
        else:
            x = torch.randn(shape, dtype=MASTER_DTYPE, device=self.device, requires_grad=True)
        targets = self.objective.probe_targets(shape[0], shape[1], vocab, self.device) if topo.is_last_stage else None
        loss_fn, compute = self._step_loss(1.0), compute_dtype(cfg.optim.precision)

        def forward() -> torch.Tensor:
            with torch.enable_grad(), torch.autocast(self.device.type, compute, enabled=compute is not None):
                out = stage(x)
                return loss_fn(out, targets) if targets is not None else out

        recompute, stage.recompute = stage.recompute, False
        try:
            held, blocks = probe_micro_batch(stage, forward)
        finally:
            stage.recompute = recompute
        ends, block = held - sum(blocks), max(blocks, default=0)
        if recompute:  # each block keeps its fp32 input; its backward recomputes the rest
            held = ends + len(blocks) * math.prod(shape) * MASTER_DTYPE.itemsize
            block *= 2
        in_flight = cfg.held_micro_batches(topo.stage)
        return MemoryEstimate(
            process=process,
            parameters=sum(p.nbytes for p in stage.parameters()) + self.objective.extra_bytes,
            gradients=sum(p.nbytes for p in self.params),
            optimizer=self.optimizer.state_bytes,
            per_micro_batch=held,
            in_flight=in_flight,
            workspace=max(block, ends),  # the backward's gradients of one block's (or the loss's) activations
            update=self.optimizer.update_bytes,
        )

    def _micro_batches_per_step(self) -> int:
        """Micro-batches a step's loss averages over: the global batch's, or in local and diloco
        mode (each replica steps on its own, as ``_loss_tokens`` counts) this replica's."""
        slots = len(self._slots(self.slots_per_step)) if self.cfg.dp.steps_alone else self.slots_per_step
        return slots * self.cfg.batch.micro_batches

    def _router_loss(self, scale: float = 1.0) -> RouterLoss | None:
        """The routers' load-balancing loss of one step (None where the model has none): each
        micro-batch adds ``coef * aux`` over the step's micro-batches (times the fp16 ``scale``),
        so the step's loss is the language-model loss plus ``coef`` times the mean aux."""
        balance = self.stage.balance
        if balance is None:
            return None
        return RouterLoss(balance, balance.coef * scale / self._micro_batches_per_step())

    def _run_slots(
        self, batch: Batch | None, slots: range, loss_fn: LossFn, train: bool,
        watch: GradientWatch | None = None, router: RouterLoss | None = None, first_file: int = 0,
        stage: Stage | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The passes over this replica's ``slots``; the last tells ``watch`` of its gradients.
        ``router``: the step's router loss (None in evaluation, which reports the token loss alone).
        ``stage``: another module of this stage's layers to run (DPO's frozen reference)."""
        cfg = self.cfg
        compute = compute_dtype(cfg.optim.precision)
        travel = compute or MASTER_DTYPE  # activations cross links at compute precision
        spec = StepSpec(self._activation_shape(), travel, loss_fn, train, compute, MASTER_DTYPE,
                        router_loss=router, positions=self.state.packing != "concat")  # fmt: skip
        schedule = SCHEDULES[cfg.pp_mode]
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        passes = self._passes(slots)
        for k, slots_in_pass in enumerate(passes):
            micro_batches = [mb for slot in slots_in_pass for mb in self._micro_batches(batch, slot, first_file)]
            last = replace(spec, watch=watch) if k == len(passes) - 1 else spec
            total += schedule(stage or self.stage, self.comm, micro_batches, last)
        return total

    def _passes(self, slots: range) -> list[range]:
        """This replica's slots grouped into pipeline passes (``RunConfig.rounds_per_pass``)."""
        per_pass = min(len(slots), self.cfg.rounds_per_pass())
        return [slots[i : i + per_pass] for i in range(0, len(slots), per_pass)]

    # -- training -------------------------------------------------------------------------------

    def step(self, batch: Batch | None, notice_pending: bool = False) -> tuple[dict[str, float], list[int]]:
        """One optimizer step on ``batch`` (None on the middle stages, which read no data): its
        metrics row, and the ranks that had a preemption notice (``notice_pending``: this rank has one),
        as the step's sums agreed. Raises ReplicasChanged where a run that regroups lost a
        replica (nothing stepped)."""
        cfg = self.cfg
        step = self.state.step + 1
        started = time.perf_counter()
        # Dropout masks come from (seed, step, rank) alone, so a resumed run draws the same ones.
        torch.manual_seed(cfg.data.seed * 1_000_003 + step * 10_007 + self.topo.rank)
        # The loss is the mean over every trained token of the global batch, so each
        # micro-batch's summed loss is divided by that count and replicas' gradients are summed.
        normalizer = max(1, self._loss_tokens(batch)) if batch is not None else 1
        bytes_before = self.comm.bytes_sent
        scaler = self.state.scaler
        scale = scaler.scale if scaler is not None else 1.0  # fp16: keep small gradients representable
        self.optimizer.zero_grad()
        watch = self.optimizer.overlap(scale)  # gradient buckets leave during the last backward
        # a mixture of experts' load-balancing loss: each micro-batch's aux, averaged over the step's
        router = self._router_loss(scale)
        loss_fn = self._step_loss(normalizer / scale)
        slots = self._slots(self.slots_per_step)
        with self.comm.tracer.span("pipeline", f"step {step}"):
            self.objective.before_pass(batch, slots, self.topo.is_last_stage)
            loss = self._run_slots(batch, slots, loss_fn, True, watch, router)
        # the step's totals summed over the replicas: its loss (the routers' summed aux, the objective's statistics)
        named = NamedTotals()
        named.add("loss", loss)
        if router is not None:
            named.add("aux_loss", router.total)
        if loss_fn.totals is not None:
            named.add("objective", loss_fn.totals)
        # one slot per replica: 1 in this replica's if this rank has a preemption notice
        dp = self.topo.data_size
        notice = torch.zeros(dp)
        notice[self.topo.replica] = float(notice_pending)
        named.add("notices", notice)
        totals = named.flat()

        self.tied.sum_ends(self.comm.all_reduce_ends)  # both ends' copies of a tied weight get the sum

        # the sum over replicas (in true units: divided by the fp16 loss scale), and this stage's
        # squared gradient norm
        lost = 0.0  # an elastic run's flag: another replica was lost, so this pipeline must not step
        try:
            totals, sq = self.optimizer.reduce(totals, scale)
        except ReplicaLostError as err:
            log.warning("%s; this pipeline is whole, so it regroups with the other survivors", err)
            lost, sq = 1.0, torch.zeros((), dtype=torch.float64)
        totals = named.read(totals)
        loss = totals["loss"][0] / scale

        # clipping by the norm over every stage's gradients; every rank sees the same norm, so
        # a non-finite one (an fp16 overflow anywhere) makes every stage and replica skip together;
        # with it, the bytes this pipeline's ranks sent between stages this step, and to other
        # replicas since the last row (local SGD's weight average comes after this point)
        dp_sent = self.optimizer.sync.bytes_sent
        sent = (self.comm.bytes_sent - bytes_before, dp_sent - self._dp_bytes_reported)
        self._dp_bytes_reported = dp_sent
        # and each stage's peak memory since the previous step's exchange (so its optimizer
        # update counts too) in a slot of its own: the sum is then a gather
        sums = PipelineSums(self.topo.stage, self.topo.pipeline_size)
        sums.add("squared_norm", sq)
        sums.add("comm_bytes", sent[0])
        sums.add("dp_bytes", sent[1])
        sums.add("trainable", self.trainable)
        sums.add("peak_mem_bytes", self.memory.peak_bytes(), per_stage=True)
        sums.add("peak_mem_estimate_bytes", self.estimate.total, per_stage=True)
        sums.add("lost", lost)
        for replica, noticed in enumerate(totals["notices"].tolist()):  # this stage's rank of each replica ...
            sums.add(f"notice/{replica}", noticed, per_stage=True)  # ... and, summed, every rank's
        self.memory.reset()
        summed = sums.reduce(self.comm.all_reduce_pipeline, self.device)
        if summed["lost"][0] > 0:  # some stage's gradient sum failed: no stage of this pipeline steps
            self.optimizer.rollback()
            raise ReplicasChanged(step)
        noticed = [(stage, r) for r in range(dp) for stage, n in enumerate(summed[f"notice/{r}"]) if n > 0]
        noticed_ranks = sorted(self.topo.rank_of(stage, r) for stage, r in noticed)
        grad_norm = math.sqrt(summed["squared_norm"][0])
        comm_bytes, dp_bytes = int(summed["comm_bytes"][0]), int(summed["dp_bytes"][0])
        trainable = int(summed["trainable"][0])
        stage_peaks = {f"peak_mem_bytes_stage{i}": int(v) for i, v in enumerate(summed["peak_mem_bytes"])}
        estimates = summed["peak_mem_estimate_bytes"]
        stage_estimates = {f"peak_mem_estimate_bytes_stage{i}": int(v) for i, v in enumerate(estimates)}
        finite = math.isfinite(grad_norm)
        if not finite:
            self.optimizer.rollback()
        lr = cfg.optim.lr_at(step)
        lost_in_update = 0.0
        if finite:
            clip = None
            if cfg.optim.max_grad_norm > 0:
                clip = min(1.0, cfg.optim.max_grad_norm / (grad_norm + 1e-6))
            with self.comm.tracer.span("optimizer step"):
                lost_in_update = self._update(lr, clip)
        if self.cfg.comm.regroups and self.optimizer.sharded:
            # ZeRO-1 gathers the updated weights after the step: a replica lost there fails only
            # its stage's gather, so every stage of this pipeline learns it before the next step
            # (the regroup then reloads the last checkpoint: the update is not everyone's)
            flag = torch.tensor([lost_in_update], dtype=torch.float64, device=self.device)
            self.comm.all_reduce_pipeline(flag)
            if flag.item() > 0:
                raise ReplicasChanged(step)
        self._after_step(step, finite, scale)
        self.optimizer.sync.end_of_step(step)  # local SGD and DiLoCo: the replicas meet again when due
        self.state.step = step
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
            row["aux_loss"] = float(totals["aux_loss"][0]) / self._micro_batches_per_step()
        if loss_fn.totals is not None:  # the objective's metrics (preference pairs: TRL's names, means over pairs)
            row.update(loss_fn.row(totals["objective"].tolist()))
        if not finite:
            row["skipped"] = True
        if self.state.scaler is not None:
            row["loss_scale"] = scale
        return row, noticed_ranks

    def _update(self, lr: float, clip: float | None) -> float:
        """The optimizer's step; 1.0 where an elastic run lost a replica in it (ZeRO-1's gather
        of the updated shards), else 0.0."""
        try:
            self.optimizer.step(lr, clip)
        except ReplicaLostError as err:
            if not self.cfg.comm.regroups:
                raise
            log.warning("%s after the update; this pipeline regroups with the other survivors", err)
            return 1.0
        return 0.0

    def _loss_tokens(self, batch: Batch) -> int:
        """What the loss is averaged over (tokens, or pairs: the objective's ``count``): the whole
        global batch, or in local and diloco mode (where each replica steps on its own) this
        replica's slices."""
        if not self.cfg.dp.steps_alone:
            return self.objective.count(batch.labels)
        return sum(self.objective.count(batch.labels[self._rows(slot)]) for slot in self._slots(self.slots_per_step))

    def _after_step(self, step: int, finite: bool, scale: float) -> None:
        """fp16 adapts its loss scale (``scale``: the one this step used); every precision gives
        up after --max-nonfinite-steps non-finite steps in a row that no smaller scale could help
        (fp32/bf16: any; fp16: those already at the scale's floor, where halving is over)."""
        limit, state, scaler = self.cfg.optim.max_nonfinite_steps, self.state, self.state.scaler
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

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float] | None:
        """The objective's loss and metrics (next-token: perplexity; preference pairs: TRL's) on
        the first ``--evaluation-num-batch`` global batches of the evaluation data (the same
        sequences at every evaluation); the reporter gets the row."""
        cfg, topo = self.cfg, self.topo
        stream = self._stream(parse_task_names(str(cfg.evaluation.path)), self.state.packing) if self.has_data else None
        loss_fn = self._step_loss(1.0)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed loss, what it averages over
        self.stage.eval()
        launched = cfg.topology.data_size  # an evaluation batch: a slot per replica the run launched with
        slots = self._slots(launched)
        for _ in range(cfg.evaluation.num_batches):
            batch = stream.next_batch(cfg.batch.batch_size * launched) if stream is not None else None
            self.objective.before_pass(batch, slots, topo.is_last_stage)
            totals[0] += float(self._run_slots(batch, slots, loss_fn, train=False, first_file=len(cfg.data.tasks)))
            if batch is not None and topo.is_last_stage:
                totals[1] += sum(self.objective.count(batch.labels[self._rows(s)]) for s in slots)
        self.stage.train()
        named = NamedTotals()
        named.add("sums", totals)
        if loss_fn.totals is not None:
            named.add("objective", loss_fn.totals)
        summed = named.flat()
        self._sum_over_replicas(summed, "the evaluation")
        if not self.is_reporter:
            return None
        summed = named.read(summed)
        loss, count = summed["sums"].tolist()
        objective = summed["objective"].tolist() if loss_fn.totals is not None else []
        return {"step": self.state.step, **self.objective.evaluation_row(loss, count, loss_fn, objective)}

    def _sum_over_replicas(self, totals: torch.Tensor, during: str) -> None:
        """Sum ``totals`` over the replicas. In an elastic run a replica lost meanwhile fails some
        stage's sum: every stage of this pipeline learns it (a flag summed along the pipeline, as
        in a step) and raises ReplicasChanged together, to regroup and do it again."""
        if self.comm.elastic is None:
            self.comm.all_reduce_data(totals)
            return
        lost = torch.zeros(1, dtype=torch.float64, device=self.device)
        try:
            self.comm.all_reduce_data(totals)
        except ReplicaLostError as err:
            log.warning("%s during %s; this pipeline is whole, so it regroups with the other survivors", err, during)
            lost.fill_(1.0)
        self.comm.all_reduce_pipeline(lost)
        if lost.item() > 0:
            raise ReplicasChanged(self.state.step)

    # -- DPO's reference ------------------------------------------------------------------------

    def _forward_only(self, batch: Batch | None, slots: range, loss_fn: LossFn, module: torch.nn.Module) -> None:
        self._run_slots(batch, slots, loss_fn, train=False, stage=module)

    def prepare_objective(self) -> None:
        """What the objective does once before the first step (DPO's precomputed reference)."""
        if not self.objective.needs_preparing:
            return
        slots = self._slots(self.cfg.topology.data_size)  # an evaluation's: a slot per launched replica
        self.objective.prepare(self.comm, self.state.step, self.identity.to_json(), self.stream, slots)
        self._dp_bytes_reported = self.comm.dp_bytes_sent  # the pass's bytes are no step's

    # -- the loop -------------------------------------------------------------------------------

    def save(self) -> None:
        """Commit this step's checkpoint (trainer.checkpoint: every rank's share, then ``latest``);
        every rank takes part. Raises CheckpointWriteError where some rank could not write."""
        state = None
        if self.topo.rank == 0:
            core = self.state.checkpoint_dict()
            scale = {"loss_scale": core.pop("loss_scale")} if "loss_scale" in core else {}
            state = {**core, "run": self.identity.to_json(), "schedule": schedule_of(self.cfg), **scale}
        cfg = self.cfg
        save_checkpoint(
            cfg.checkpoint.path, self.state.step, self.stage, self.optimizer, self.comm, state, cfg.model.model_name,
            self.disks, keep=cfg.checkpoint.keep,
        )  # fmt: skip
        self.committed_step = self.state.step

    # -- an elastic run's changes (run.elastic) -------------------------------------------------

    def use(self, comm: Communicator, disks: Disks | None = None) -> None:
        """The communicator of the run's generation now (and ``disks``: who shares this rank's
        checkpoint folder in it), as an elastic run's replicas come and go."""
        self.comm = comm
        if disks is not None:
            self.disks = disks
        if self.optimizer is not None:
            self.optimizer.sync.use(comm)

    def load_state(self, state: dict) -> None:
        """Take a checkpoint's or a live replica's ``TrainState`` (trainer.state), and the data
        stream's position with it."""
        self.state.load_state_dict(state, self.cfg.data.packing)
        if self.stream is not None:
            self.stream.load_state_dict(state["data"])
        else:  # the middle stages read no data and keep no position
            self.state.data = None

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """What a joiner or spare needs of this stage besides the state: its trained weights and
        optimizer state, by name (the frozen rest it loads itself)."""
        tensors = {f"param/{n}": p.detach() for n, p in self.stage.named_parameters() if p.requires_grad}
        tensors.update({f"optim/{k}": v for k, v in self.optimizer.state_tensors(self.stage).items()})
        return tensors

    def load_shared(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take ``shared_tensors()`` of this stage's rank in a live replica."""
        params = dict(self.stage.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                if name.startswith("param/"):
                    params[name[len("param/") :]].copy_(value)
        optim = {k[len("optim/") :]: v for k, v in tensors.items() if k.startswith("optim/")}
        self.optimizer.load_state_tensors(self.stage, optim)
