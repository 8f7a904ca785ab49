"""A rank's training: its stage, optimizer, data and state, and what one step, one evaluation or
one checkpoint does (when each runs, and what a lost peer or a notice changes, is run.supervisor;
how a process enters a run, run.entry)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import torch

from comm.process_group import Communicator, ReplicaLostError
from comm.topology import Topology
from data.stream import Batch, TaskSpec, TokenStream, parse_task_names
from data_parallel.base import Trained
from data_parallel.choose import make_sync
from generation.engine import Stops
from modules.layout import checkpoint_dir, latest_step
from objectives import Objective, RunContext, StepLoss, Targets, make_objective
from observability.metrics import ONCE, PER_STAGE, NamedTotals
from pipeline.schedule import SCHEDULES, GradientWatch, LossFn, MicroBatch, RouterLoss, StepSpec
from pipeline.stage import Stage
from pipeline.tied import TiedCopy
from trainer.checkpoint import TRAINER_STATE, Disks, load_checkpoint, save_checkpoint
from trainer.config import RunConfig
from trainer.identity import RunIdentity, check_resume, schedule_of
from trainer.memory import MemoryEstimate, PeakMemory, estimate_memory, resident_bytes
from trainer.optimizer import StageOptimizer, decayed_names
from trainer.precision import MASTER_DTYPE, LossScaler, compute_dtype
from trainer.rollout import prompt_stream
from trainer.startup import Plan
from trainer.state import ReplicasChanged, TrainState
from trainer.step import train_step

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
        self.objective: Objective = make_objective(cfg.objective, cfg.batch.micro_batch_size)  # (objectives/)
        # the stages that read the data: the ends; every stage where each step generates its rows
        self.has_data = self.topo.is_first_stage or self.topo.is_last_stage or self.objective.generates
        # a step's global batch in slots of --batch-size sequences, replica r training every
        # data_size-th slot from r: with the launch's replicas, round a's r-th slice as always;
        # with fewer (an elastic run that lost some) the same sequences over fewer pipelines
        self.slots_per_step = cfg.global_batch_sequences // cfg.batch.batch_size
        # what it carries from step to step besides its tensors (trainer.state)
        self.state = TrainState(packing=cfg.data.packing or ("none" if cfg.objective.pairs else "documents"))
        self.stage: Stage | None = None
        self.tokenizer = None
        self.pad_id = 0  # the token sequences are padded with (the first and last stages read it in setup)
        self.stops: Stops | None = None  # where a generated completion ends (an objective that generates)
        self.stream: TokenStream | None = None
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
        self.estimate = estimate_memory(self, process)
        log.info("memory estimate: %s (peak_mem_bytes in metrics.jsonl is the measure)", self.estimate.describe(),
                 extra=PER_STAGE)  # fmt: skip
        self.state.scaler = LossScaler(cfg.optim.loss_scale) if cfg.optim.precision == "fp16" else None
        if self.has_data:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name)
            if self.objective.generates:  # prompts, whose completions each step generates (trainer.rollout)
                self.stream, self.stops = prompt_stream(cfg, self.tokenizer)
                self.pad_id = self.stops.pad_id
            else:  # a new stream packs as asked (None: the default), a resumed one as it recorded
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
        metrics row, and the ranks that had a preemption notice (``notice_pending``: this rank
        has one), as the step's sums agreed (trainer.step)."""
        return train_step(self, batch, notice_pending)

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
