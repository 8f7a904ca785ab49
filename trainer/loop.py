"""The training run: connect, agree on a healthy start, then step, log and checkpoint."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comm.process_group import Communicator
from comm.topology import Topology
from modules import Family, family_for, load_config
from pipeline.partition import split_layers
from pipeline.schedule import MicroBatch, gpipe_step
from pipeline.stage import Stage
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import RunConfig
from trainer.data import TokenStream
from trainer.metrics import MetricsWriter

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


class StartupError(RuntimeError):
    """A rank could not start; raised on every rank so none waits for it."""


@dataclass
class Plan:
    """What this rank computes, derived from the configs and the model's config.json."""

    family: Family
    model_config: object
    layers: range


def plan_stage(cfg: RunConfig) -> Plan:
    """Checks that need only the flags and config.json: identical on every rank, run before connecting."""
    model_config = load_config(cfg.model.model_name)
    family = family_for(cfg.model.model_type or model_config.model_type)
    if cfg.model.embedding_dim is not None and cfg.model.embedding_dim != model_config.hidden_size:
        raise ValueError(
            f"--embedding-dim {cfg.model.embedding_dim} != hidden size {model_config.hidden_size} in config.json; "
            "drop the flag or fix it"
        )
    embedding, layer, head = part_sizes(family, model_config)
    split = split_layers(
        model_config.num_hidden_layers,
        cfg.topology.pipeline_size,
        cfg.model.layers_per_stage,
        layer_cost=layer,
        first_extra=embedding,
        last_extra=head,
    )
    return Plan(family, model_config, split[cfg.topology.stage])


def part_sizes(family: Family, model_config: object) -> tuple[int, int, int]:
    """Parameter counts of the embedding, one layer and the head, without allocating them."""
    with torch.device("meta"):
        parts = (family.embedding(model_config), family.block(model_config, 0), family.head(model_config))
    return tuple(sum(p.numel() for p in part.parameters()) for part in parts)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: int) -> torch.Tensor:
    """Summed next-token cross-entropy of a micro-batch over the global batch's token count."""
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1].reshape(-1, vocab).float()  # position t predicts token t+1
    shifted_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / normalizer


def set_threads(hosts: list[str]) -> int:
    """One thread per core this rank may use: cores divided among the ranks on this host."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()  # the user decided
    local_ranks = max(1, hosts.count(socket.gethostname()))
    threads = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    torch.set_num_threads(threads)
    return threads


class Trainer:
    def __init__(self, cfg: RunConfig, plan: Plan, comm: Communicator) -> None:
        self.cfg = cfg
        self.plan = plan
        self.comm = comm
        self.topo: Topology = cfg.topology
        self.device = torch.device(cfg.device)
        self.has_data = self.topo.is_first_stage or self.topo.is_last_stage
        self.is_reporter = self.topo.rank == self.topo.rank_of(self.topo.pipeline_size - 1, 0)
        self.step = 0
        self.stage: Stage | None = None
        self.stream: TokenStream | None = None

    def setup(self) -> None:
        """Build and load this rank's stage, optimizer and data stream (may raise)."""
        cfg, topo = self.cfg, self.topo
        self.stage = Stage(
            self.plan.family, self.plan.model_config, self.plan.layers, topo.is_first_stage, topo.is_last_stage
        )
        if cfg.model.load_pretrained:
            self.stage.load_parts(cfg.model.model_name)
        else:
            self.stage.init_parts(getattr(self.plan.model_config, "initializer_range", 0.02), cfg.data.seed)
        self.stage.to(self.device).train()
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=(0.9, 0.999), eps=1e-8
        )
        if self.has_data:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name)
            self.stream = TokenStream(cfg.data.tasks, tokenizer, cfg.data.seq_length, cfg.data.seed)
        resumed = load_checkpoint(cfg.checkpoint.path, self.stage, self.optimizer) if cfg.checkpoint.resume else None
        if resumed is not None:
            self.step, state = resumed
            if self.stream is not None:
                self.stream.load_state_dict(state["data"])
            log.info("resumed from step %d of %s", self.step, cfg.checkpoint.path)

    def _micro_batches(self, sequences: torch.Tensor | None, round_index: int) -> list[MicroBatch]:
        cfg, topo = self.cfg, self.topo
        m = cfg.batch.micro_batch_size
        if sequences is None:
            return [MicroBatch(None, None)] * cfg.batch.micro_batches
        # Round a of the step holds batch x dp sequences; replica r takes its contiguous slice.
        start = (round_index * topo.data_size + topo.replica) * cfg.batch.batch_size
        mine = sequences[start : start + cfg.batch.batch_size].to(self.device)
        return [
            MicroBatch(
                mine[i : i + m] if topo.is_first_stage else None,
                mine[i : i + m] if topo.is_last_stage else None,
            )
            for i in range(0, cfg.batch.batch_size, m)
        ]

    def train_step(self) -> dict[str, float]:
        cfg, topo = self.cfg, self.topo
        step = self.step + 1
        started = time.perf_counter()
        per_step = cfg.batch.batch_size * topo.data_size * cfg.batch.accumulate_steps
        sequences = self.stream.next_sequences(per_step) if self.stream is not None else None
        # The loss is the mean over every predicted token of the global batch, so each
        # micro-batch's summed loss is divided by that count and replicas' gradients are summed.
        normalizer = int((sequences[:, 1:] != IGNORE_INDEX).sum()) if sequences is not None else 1
        shape = (cfg.batch.micro_batch_size, cfg.data.seq_length, self.plan.model_config.hidden_size)
        dtype = next(self.stage.parameters()).dtype

        self.optimizer.zero_grad(set_to_none=False)
        loss = torch.zeros((), dtype=torch.float32)
        for round_index in range(cfg.batch.accumulate_steps):
            micro = self._micro_batches(sequences, round_index)
            loss += gpipe_step(
                self.stage, self.comm, micro, shape, dtype, lambda out, lab: token_loss(out, lab, normalizer)
            )

        # tied embedding: both ends' copies get the sum of both gradients
        tied = self.stage.tied_copy()
        if tied is not None:
            self.comm.all_reduce_ends(tied.grad)

        # data parallel: one flat buffer of all gradients (and the loss) per step
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.to(grads[0]).reshape(1)])
        self.comm.all_reduce_data(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        loss = flat[-1].detach().cpu()

        # clipping by the norm over every stage's gradients
        counted = [p.grad for p in self.params if not (p is tied and self.topo.is_last_stage)]  # tied: count once
        sq = torch.stack([torch.linalg.vector_norm(g) for g in counted]).pow(2).sum().reshape(1).cpu()
        self.comm.all_reduce_pipeline(sq)
        grad_norm = float(sq.sqrt())
        if cfg.optim.max_grad_norm > 0:
            coef = min(1.0, cfg.optim.max_grad_norm / (grad_norm + 1e-6))
            for g in grads:
                g.mul_(coef)

        lr = cfg.optim.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step = step
        elapsed = time.perf_counter() - started
        tokens = per_step * cfg.data.seq_length
        return {
            "step": step,
            "loss": float(loss),
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed,
        }

    def checkpoint(self) -> None:
        state = None
        if self.topo.rank == 0:
            state = {"step": self.step, "data": self.stream.state_dict()}
        save_checkpoint(
            self.cfg.checkpoint.path, self.step, self.stage, self.optimizer, self.comm, state, self.cfg.model.model_name
        )

    def train(self) -> None:
        cfg = self.cfg
        metrics = MetricsWriter(cfg.checkpoint.path / "metrics.jsonl") if self.is_reporter else None
        if self.step >= cfg.optim.total_steps:
            log.info(
                "nothing to do: the checkpoint is at step %d of --total-steps %d", self.step, cfg.optim.total_steps
            )
        while self.step < cfg.optim.total_steps:
            row = self.train_step()
            if metrics is not None:
                metrics.write(row)
            if metrics is not None and (self.step % cfg.log_interval == 0 or self.step == cfg.optim.total_steps):
                log.info(
                    "step %d/%d loss %.4f lr %.3g %.0f tok/s",
                    row["step"], cfg.optim.total_steps, row["loss"], row["lr"], row["tokens_per_s"],
                )  # fmt: skip
            if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.optim.total_steps:
                self.checkpoint()


def agree_on_start(trainer: Trainer, cfg: RunConfig, error: str | None) -> list[str]:
    """Every rank shares its status; any failure or mismatch stops all ranks with its reason."""
    status = {
        "error": error,
        "fingerprint": cfg.fingerprint(),
        "step": trainer.step,
        "host": socket.gethostname(),
    }
    statuses = trainer.comm.all_gather_object(status)
    topo = cfg.topology
    problems = [f"{topo.describe(r)}: {s['error']}" for r, s in enumerate(statuses) if s["error"]]
    if not problems:
        odd = [r for r, s in enumerate(statuses) if s["fingerprint"] != statuses[0]["fingerprint"]]
        if odd:
            problems.append(
                f"ranks {odd} were started with other training flags than rank 0; launch every rank with the same flags"
            )
        steps = sorted({s["step"] for s in statuses})
        if len(steps) > 1:
            problems.append(f"ranks resume from different steps {steps}; give every rank the same checkpoint files")
    if problems:
        raise StartupError("cannot start: " + "; ".join(problems))
    return [s["host"] for s in statuses]


def run(cfg: RunConfig) -> None:
    plan = plan_stage(cfg)
    tied = bool(getattr(plan.model_config, "tie_word_embeddings", False))
    comm = Communicator.connect(cfg.topology, cfg.comm, torch.device(cfg.device), link_ends=tied)
    try:
        trainer = Trainer(cfg, plan, comm)
        error = None
        try:
            trainer.setup()
        except Exception as err:  # noqa: BLE001 - not swallowed: every rank re-raises it below
            error = f"{type(err).__name__}: {err}"
        hosts = agree_on_start(trainer, cfg, error)
        threads = set_threads(hosts)
        log.info("layers %s, %d threads, %s", list(plan.layers), threads, cfg.device)
        trainer.train()
    finally:
        comm.close()
