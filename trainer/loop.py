"""A rank's training: its stage, optimizer and data, and the loop that steps, evaluates, logs and
checkpoints (how a process enters a run is trainer.entry)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch

from comm.process_group import Communicator, PeerLostError, ReplicaLostError
from comm.topology import Topology
from data.stream import Batch, Prefetcher, TaskSpec, TokenStream, parse_task_names, resumed_packing
from data_parallel.base import Trained
from data_parallel.choose import make_sync
from modules.layout import checkpoint_dir, latest_step
from objectives import Objective, RunContext, StepLoss, Targets, make_objective
from observability.metrics import ONCE, PER_STAGE, MetricsWriter, NamedTotals, PipelineSums, Progress
from observability.profiling import Profiler
from pipeline.schedule import SCHEDULES, GradientWatch, LossFn, MicroBatch, RouterLoss, StepSpec
from pipeline.stage import Stage
from pipeline.tied import TiedCopy
from trainer.checkpoint import TRAINER_STATE, CheckpointWriteError, Disks, load_checkpoint, save_checkpoint
from trainer.config import RunConfig
from trainer.elastic import ElasticController, ReplicasChanged
from trainer.identity import RunIdentity, check_resume, schedule_of
from trainer.memory import MemoryEstimate, PeakMemory, probe_micro_batch, resident_bytes
from trainer.optimizer import StageOptimizer, decayed_names
from trainer.precision import MASTER_DTYPE, LossScaler, compute_dtype
from trainer.preemption import PreemptionNotice
from trainer.startup import Plan

log = logging.getLogger(__name__)
# logged beside an evaluation's loss
EVAL_SHOWN = ("perplexity", "rewards/accuracies", "rewards/margins", "accuracy", "margin")


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        plan: Plan,
        comm: Communicator | None,
        disks: Disks | None,
        notice: PreemptionNotice,
    ) -> None:
        """``comm`` and ``disks`` are None for a rank joining a live elastic run, which sets up
        first and gets them when the run takes it in (``join_run``). ``notice`` is this process's
        preemption notice (trainer.preemption), shared with every rank at each step's end."""
        self.cfg = cfg
        self.notice = notice
        # the ranks that had a preemption notice, as the last step's sums agreed
        self.noticed: list[int] = []
        self.disks = disks  # who shares this rank's checkpoint folder
        self.plan = plan
        self.comm = comm
        self.device = torch.device(cfg.device)
        self.has_data = self.topo.is_first_stage or self.topo.is_last_stage
        # a step's global batch in slots of --batch-size sequences, replica r training every
        # data_size-th slot from r: with the launch's replicas, round a's r-th slice as always;
        # with fewer (an elastic run that lost some) the same sequences over fewer pipelines
        self.slots_per_step = cfg.global_batch_sequences // cfg.batch.batch_size
        self.step = 0
        self.stage: Stage | None = None
        self.tokenizer = None
        self.pad_id = 0  # the token sequences are padded with (the first and last stages read it in setup)
        self.stream: TokenStream | None = None
        self.data_state: dict | None = None  # stream position after the last batch trained on
        # how examples become sequences: the flag, else documents for a new run (preference
        # pairs: none) and what a resumed run's stream recorded (every rank: the first stage's
        # positions travel if not concat)
        self.packing = cfg.data.packing or ("none" if cfg.objective.pairs else "documents")
        self.objective: Objective = make_objective(cfg.objective)  # what the last stage trains for (objectives/)
        self.scaler: LossScaler | None = None
        self.optimizer: StageOptimizer | None = None
        self._dp_bytes_reported = 0
        # consecutive steps skipped for non-finite gradients (fp16: those at the loss scale's floor)
        self.nonfinite_run = 0
        self.memory = PeakMemory(self.device)
        self.estimate: MemoryEstimate | None = None  # of this stage's peak, made in setup
        self.loss_chunk = 0  # tokens the loss projects at a time (0: all logits), set in setup
        # replicas leaving and joining, spares taking lost ranks' places
        self.elastic = ElasticController(self) if cfg.comm.regroups else None
        self.events: list[dict] = []  # metrics rows saying who left, joined or took over, for the reporter
        # a spare that took a place after a step, during its evaluation or checkpoint: where it starts
        self.joined_during: str | None = None
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
        self.scaler = LossScaler(cfg.optim.loss_scale) if cfg.optim.precision == "fp16" else None
        if self.has_data:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name)
            # a new stream packs as asked (None: the default), a resumed one as it recorded
            self.stream = self._stream(cfg.data.tasks, "none" if cfg.objective.pairs else cfg.data.packing)
            self.pad_id = self.stream.pad_id
            self.data_state = self.stream.state_dict()
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
            self.step, state = resumed
            self.committed_step = self.step
            if self.scaler is not None and "loss_scale" in state:
                self.scaler.load_state_dict(state["loss_scale"])
            self.nonfinite_run = state.get("nonfinite_run", 0)
            self.packing = resumed_packing(cfg.data.packing, state["data"])
            if self.stream is not None:
                self.stream.load_state_dict(state["data"])
                self.data_state = state["data"]
            log.info("resumed from step %d of %s", self.step, cfg.checkpoint.path)

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
        travel = first and self.packing != "concat"  # concat: every stage counts 0..seq-1 itself
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
                        router_loss=router, positions=self.packing != "concat")  # fmt: skip
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
            self.comm.abandon(err)
            if in_step:
                self.optimizer.rollback()
            raise ReplicasChanged(step) from None

    def train_step(self, batch: Batch | None) -> dict[str, float]:
        with self._regroup_on_loss(self.step + 1, f"step {self.step + 1}", in_step=True):
            return self._train_step(batch)

    def _train_step(self, batch: Batch | None) -> dict[str, float]:
        cfg = self.cfg
        step = self.step + 1
        started = time.perf_counter()
        # Dropout masks come from (seed, step, rank) alone, so a resumed run draws the same ones.
        torch.manual_seed(cfg.data.seed * 1_000_003 + step * 10_007 + self.topo.rank)
        # The loss is the mean over every trained token of the global batch, so each
        # micro-batch's summed loss is divided by that count and replicas' gradients are summed.
        normalizer = max(1, self._loss_tokens(batch)) if batch is not None else 1
        bytes_before = self.comm.bytes_sent
        scale = self.scaler.scale if self.scaler is not None else 1.0  # fp16: keep small gradients representable
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
        notice[self.topo.replica] = float(self.notice.pending)
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
        self.noticed = sorted(self.topo.rank_of(stage, r) for stage, r in noticed)
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
        if self.elastic is not None and self.optimizer.sharded:
            # ZeRO-1 gathers the updated weights after the step: a replica lost there fails only
            # its stage's gather, so every stage of this pipeline learns it before the next step
            # (the regroup then reloads the last checkpoint: the update is not everyone's)
            flag = torch.tensor([lost_in_update], dtype=torch.float64, device=self.device)
            self.comm.all_reduce_pipeline(flag)
            if flag.item() > 0:
                raise ReplicasChanged(step)
        self._after_step(step, finite, scale)
        self.optimizer.sync.end_of_step(step)  # local SGD and DiLoCo: the replicas meet again when due
        self.step = step
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
        if self.scaler is not None:
            row["loss_scale"] = scale
        return row

    def _update(self, lr: float, clip: float | None) -> float:
        """The optimizer's step; 1.0 where an elastic run lost a replica in it (ZeRO-1's gather
        of the updated shards), else 0.0."""
        try:
            self.optimizer.step(lr, clip)
        except ReplicaLostError as err:
            if self.elastic is None:
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
        limit = self.cfg.optim.max_nonfinite_steps
        if self.scaler is not None:
            hopeless = not finite and scale <= self.scaler.floor
            self.scaler.update(finite)
            self.nonfinite_run = self.nonfinite_run + 1 if hopeless else 0
            if not finite:
                log.warning(
                    "step %d: gradients overflowed in fp16; skipped, loss scale now %g", step, self.scaler.scale
                )
            if self.nonfinite_run >= limit:
                raise FloatingPointError(
                    f"fp16 cannot make progress: {self.nonfinite_run} steps in a row (up to step {step}) overflowed "
                    f"at the smallest loss scale ({self.scaler.floor:g}), so the values themselves exceed fp16's "
                    "range; train with --bf16 (or in fp32), or lower --lr; the last checkpoint is intact"
                )
            return
        self.nonfinite_run = 0 if finite else self.nonfinite_run + 1
        if not finite:
            log.warning("step %d: non-finite gradients; step skipped (%d in a row)", step, self.nonfinite_run)
        if self.nonfinite_run >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_run} steps in a row (up to step {step}) had non-finite loss or gradients; "
                "lower --lr, check the data, or try --bf16; the last checkpoint is intact"
            )

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float] | None:
        """The objective's loss and metrics (next-token: perplexity; preference pairs: TRL's) on
        the first ``--evaluation-num-batch`` global batches of the evaluation data (the same
        sequences at every evaluation); the reporter gets the row."""
        cfg, topo = self.cfg, self.topo
        stream = self._stream(parse_task_names(str(cfg.evaluation.path)), self.packing) if self.has_data else None
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
        return {"step": self.step, **self.objective.evaluation_row(loss, count, loss_fn, objective)}

    def _evaluation_row(self) -> dict[str, float] | None:
        """``evaluate()``; in an elastic run that loses a replica meanwhile, the survivors regroup
        and evaluate again (the same batches, split over fewer replicas)."""
        while True:
            try:
                with self._regroup_on_loss(self.step, f"the evaluation after step {self.step}"):
                    return self.evaluate()
            except ReplicasChanged:
                self.elastic.regroup(self.step, during="evaluation")

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
            raise ReplicasChanged(self.step)

    # -- DPO's reference ------------------------------------------------------------------------

    def _forward_only(self, batch: Batch | None, slots: range, loss_fn: LossFn, module: torch.nn.Module) -> None:
        self._run_slots(batch, slots, loss_fn, train=False, stage=module)

    def prepare_objective(self) -> None:
        """What the objective does once before the first step (DPO's precomputed reference)."""
        if not self.objective.needs_preparing:
            return
        slots = self._slots(self.cfg.topology.data_size)  # an evaluation's: a slot per launched replica
        self.objective.prepare(self.comm, self.step, self.identity.to_json(), self.stream, slots)
        self._dp_bytes_reported = self.comm.dp_bytes_sent  # the pass's bytes are no step's

    # -- the loop -------------------------------------------------------------------------------

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
        """``_save``. In a run whose ranks regroup (--elastic, --spares), a rank lost during the
        commit fails its gathers on every survivor before any of them moves ``latest`` (or, lost
        after the last one, each has moved it): the survivors regroup and commit the same step
        again, so it ends committed on every one of them."""
        while True:
            try:
                with self._regroup_on_loss(self.step, f"the commit of checkpoint {self.step}", commit=True):
                    self._save()
                self.committed_step = self.step
                return
            except ReplicasChanged:
                self.elastic.regroup(self.step, during="checkpoint")

    def _save(self) -> None:
        state = None
        if self.topo.rank == 0:
            state = {"step": self.step, "data": self.data_state, "nonfinite_run": self.nonfinite_run,
                     "run": self.identity.to_json(), "schedule": schedule_of(self.cfg)}  # fmt: skip
            if self.scaler is not None:
                state["loss_scale"] = self.scaler.state_dict()
        cfg = self.cfg
        save_checkpoint(
            cfg.checkpoint.path, self.step, self.stage, self.optimizer, self.comm, state, cfg.model.model_name,
            self.disks, keep=cfg.checkpoint.keep,
        )  # fmt: skip

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
        staying = self.topo.data_size - len(noticed)
        if not self.cfg.comm.elastic or staying < max(1, self.cfg.dp.min_replicas):
            self._stop_for_notice(metrics)
            return True
        if not self.cfg.dp.replicated:  # the survivors go on through a checkpoint: this step's loses nothing
            self.checkpoint(must=True)
        self.comm.quiesce(f"the notice after step {self.step}")
        if self.topo.replica in noticed:
            self._leave_for_notice()
            return True
        self.elastic.regroup(self.step, why="preempted")
        return False

    def _noticed_replicas(self) -> list[int]:
        return sorted({rank // self.topo.pipeline_size for rank in self.noticed})

    def _replace_noticed(self) -> bool:
        """--spares, a free spare for each noticed rank: every rank commits this step (so nothing
        is lost, and it is what every rank loads where no live replica can hand a spare its stage's
        state), the noticed ranks leave, and the others regroup with spares in their places and
        go on from this step, its evaluation (when due) done with them. True: this rank left."""
        started = time.perf_counter()
        self.checkpoint(must=True)
        launch_ranks = self.comm.elastic.membership.launch_ranks()
        self.events.append({"step": self.step, "event": "preempted",
                            "noticed_launch_ranks": [launch_ranks[r] for r in self.noticed],
                            "commit_s": time.perf_counter() - started, "unix_time": time.time()})  # fmt: skip
        self.comm.quiesce(f"the notice after step {self.step}")
        if self.topo.rank in self.noticed:
            self.comm.leave(f"preempted ({self.notice.signal_name or 'a notice'})", replaceable=True)
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
        self.comm.leave(f"preempted ({self.notice.signal_name or 'a notice to its replica'})")
        after = f", {self.notice.seconds_since():.1f}s after the notice" if self.notice.pending else ""
        log.warning("preempted: this replica leaves the elastic run after step %d%s; the other replicas train on",
                    self.step, after)  # fmt: skip

    def _report_events(
        self, metrics: MetricsWriter | None, progress: Progress | None
    ) -> tuple[MetricsWriter | None, Progress | None]:
        """The metrics writer and progress bar, opened once this rank is the reporter (from the
        start, or since a regroup made it so) and closed when a joining replica takes that role
        back, with --elastic's pending event rows written; every other rank drops them."""
        if not self.is_reporter and metrics is not None:
            progress.close()
            metrics.close()
            metrics = progress = None
        if self.is_reporter and metrics is None:
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
            self.elastic.grow_if_due()
        return metrics, progress

    def train(self) -> None:
        cfg = self.cfg
        total = cfg.optim.total_steps
        if self.step >= total:
            log.info("nothing to do: the checkpoint is at step %d of --total-steps %d", self.step, total)
            return
        metrics = progress = None
        pin = self.device.type == "cuda"
        prefetch = (
            Prefetcher(self.stream, cfg.global_batch_sequences, pin_memory=pin) if self.stream is not None else None
        )
        profiler = Profiler(cfg.profiling, cfg.checkpoint.path, cfg.batch.micro_batches, self.comm)
        self.memory.reset()
        first_step = self.step + 1
        try:
            if self.joined_during is not None:  # a spare that took its place after this step
                metrics, progress = self._after_step_row(metrics, progress, first=self.joined_during)
            while self.step < total:
                metrics, progress = self._report_events(metrics, progress)
                with self.comm.tracer.span("step", f"step {self.step + 1}"):
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
                        self.data_state = after  # trained on: where a checkpoint, joiner or spare goes on from
                metrics, progress = self._report_events(metrics, progress)  # who left, before the step's row
                if self.step == first_step:  # the optimizer's state exists from its first update
                    log.info("optimizer state held on this rank: %.3g GB (%d bytes)",
                             self.optimizer.held_bytes() / 1e9, self.optimizer.held_bytes())  # fmt: skip
                profiler.stepped()
                if metrics is not None:
                    metrics.write(row)
                    progress.update(row)
                    if self.step % cfg.log_interval == 0 or self.step == total:
                        log.info(
                            "step %d/%d loss %.4f lr %.3g %.0f tok/s",
                            row["step"], total, row["loss"], row["lr"], row["tokens_per_s"],
                        )  # fmt: skip
                if self.noticed:  # a preemption notice reached some rank (trainer.preemption)
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
