"""Small frozen configs, one per concern; each checks itself and names the flag to fix."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from comm.config import CommConfig
from comm.topology import Topology
from data.config import DataConfig
from data.stream import parse_task_names
from data_parallel.config import DataParallelConfig
from generation.config import GenerationConfig
from modules.lora import LoraSpec
from objectives.config import ObjectiveConfig
from trainer.optimizer import OptimConfig

# --loss-chunk-tokens auto: chunks of this many tokens once a micro-batch's fp32 logits reach
# AUTO_CHUNK_MIB (measured: on a 490-token vocabulary the chunked loss took 4.6 ms a micro-batch
# of 128 tokens against 3.0 ms, to save 0.25 MB; on Pythia's 50k at seq 1024 it saves 0.4 GB)
AUTO_CHUNK_TOKENS, AUTO_CHUNK_MIB = 256, 64


def str2bool(text: str) -> bool:
    """A flag's true or false, as users write them (``--load-checkpoint false``)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def layer_counts(text: str) -> tuple[int, ...]:
    """``--num-layers``: one count, or one per stage like 5,4,4,3."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or comma-separated counts, not {text!r}") from None


@dataclass(frozen=True)
class ModelConfig:
    model_name: str
    tokenizer_name: str
    model_type: str | None = None
    load_pretrained: bool = True
    layers_per_stage: tuple[int, ...] | None = None
    embedding_dim: int | None = None
    moe_aux_loss_coef: float | None = None  # None: the config's choice (modules.routing.with_router_loss)

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--model-name", required=True, help="layer-sharded model directory (convert/from_hf.py output)"
        )
        group.add_argument("--tokenizer-name", default=None, help="tokenizer directory (default: --model-name)")
        group.add_argument("--model-type", default=None, help="model family; default: detected from config.json")
        group.add_argument(
            "--load-pretrained-model", type=str2bool, default=True, help="load weights (false: random init)"
        )
        group.add_argument(
            "--num-layers",
            type=layer_counts,
            default=None,
            help="layers per stage: one count for all stages, or one per stage like 5,4,4,3 "
            "(default: balanced by parameter count)",
        )
        group.add_argument("--embedding-dim", type=int, default=None, help="hidden size, checked against config.json")
        group.add_argument(
            "--moe-aux-loss-coef",
            type=float,
            default=None,
            help="mixture of experts: weight of the routers' load-balancing loss (0: off; default: as config.json "
            "says, HF's rule: on with router_aux_loss_coef where output_router_logits is true)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelConfig:
        return cls(
            model_name=args.model_name,
            tokenizer_name=args.tokenizer_name or args.model_name,
            model_type=args.model_type.replace("-", "") if args.model_type else None,
            load_pretrained=args.load_pretrained_model,
            layers_per_stage=args.num_layers,
            embedding_dim=args.embedding_dim,
            moe_aux_loss_coef=args.moe_aux_loss_coef,
        )


@dataclass(frozen=True)
class BatchConfig:
    batch_size: int  # sequences per data-parallel replica per accumulation step
    micro_batch_size: int
    accumulate_steps: int = 1

    def __post_init__(self) -> None:
        if min(self.batch_size, self.micro_batch_size, self.accumulate_steps) < 1:
            raise ValueError("--batch-size, --micro-batch-size and --gradient-accumulate-step must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size {self.micro_batch_size}"
            )

    @property
    def micro_batches(self) -> int:
        return self.batch_size // self.micro_batch_size

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--batch-size", type=int, default=4, help="sequences (dpo: pairs) per data-parallel replica per step"
        )
        group.add_argument(
            "--micro-batch-size", type=int, default=1, help="sequences (dpo: pairs) per pipeline micro-batch"
        )
        group.add_argument("--gradient-accumulate-step", type=int, default=1, help="batches summed per optimizer step")

    @classmethod
    def from_args(cls, args: argparse.Namespace, pairs: bool) -> BatchConfig:
        """The batch in sequences: under a pair objective (``pairs``) the flags count pairs, two sequences each."""
        batch = cls(args.batch_size, args.micro_batch_size, args.gradient_accumulate_step)
        if not pairs:
            return batch
        return replace(batch, batch_size=2 * batch.batch_size, micro_batch_size=2 * batch.micro_batch_size)


@dataclass(frozen=True)
class CheckpointConfig:
    path: Path
    every_steps: int
    resume: bool = True
    keep: int = 0  # newest checkpoints kept; 0 keeps all
    # after SIGTERM/SIGUSR1, how long the run may take to commit the step's checkpoint and exit
    # before the signal takes its default effect (run.preemption); may differ between ranks
    preempt_grace_s: float = 60.0
    # a checkpoint some rank cannot write (a full disk, an I/O error) is abandoned on every rank;
    # then the run stops, or goes on and tries again at the next one (the last always stops)
    on_error: str = "stop"

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError("--checkpoint-steps must be at least 1")
        if self.on_error not in ("stop", "continue"):
            raise ValueError(f"--on-checkpoint-error {self.on_error!r} is not one of ['stop', 'continue']")
        if not self.preempt_grace_s > 0:
            raise ValueError("--preempt-grace must be a number of seconds > 0 (the notice a preemption gives)")
        if self.keep < 0:
            raise ValueError("--keep-checkpoints must be >= 0 (0 keeps every checkpoint)")

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--checkpoint-path", default="model_checkpoints", help="where checkpoints and metrics go")
        group.add_argument("--checkpoint-steps", type=int, default=100, help="save every N steps (and at the end)")
        group.add_argument("--load-checkpoint", type=str2bool, default=True,
                           help="resume from <checkpoint-path>/latest")  # fmt: skip
        group.add_argument("--keep-checkpoints", type=int, default=0, help="keep the newest K checkpoints (0: all)")
        group.add_argument(
            "--on-checkpoint-error",
            choices=("stop", "continue"),
            default="stop",
            help="a checkpoint that cannot be written (no space, an I/O error) is abandoned on every rank, leaving "
            "latest and the earlier ones as they were; then stop (naming the path and the room needed), or train "
            "on and try again at the next checkpoint (the last one always stops)",
        )
        group.add_argument(
            "--preempt-grace",
            type=float,
            default=60.0,
            metavar="S",
            help="on SIGTERM or SIGUSR1 the run commits a checkpoint at the end of the step and exits 0; if it has "
            "not within S seconds (or a second signal comes), the signal stops it at once",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CheckpointConfig:
        return cls(
            path=Path(args.checkpoint_path),
            every_steps=args.checkpoint_steps,
            resume=args.load_checkpoint,
            keep=args.keep_checkpoints,
            preempt_grace_s=args.preempt_grace,
            on_error=args.on_checkpoint_error,
        )


@dataclass(frozen=True)
class EvalConfig:
    path: Path | None = None
    every_steps: int = 0  # 0: only after the last step
    num_batches: int = 10

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.num_batches < 1:
            raise ValueError("--evaluation-steps must be >= 0 and --evaluation-num-batch >= 1")

    def due(self, step: int, total_steps: int) -> bool:
        if self.path is None:
            return False
        return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--evaluation-data", default=None, help="held-out data (any --task-name file type)")
        group.add_argument("--evaluation-steps", type=int, default=0, help="evaluate every K steps (0: after the last)")
        group.add_argument("--evaluation-num-batch", type=int, default=10, help="global batches per evaluation")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalConfig:
        path = None
        if args.evaluation_data is not None:
            tasks = parse_task_names(args.evaluation_data)  # checks the file now, not at the first evaluation
            if len(tasks) != 1:
                raise ValueError(f"--evaluation-data takes one file, not {len(tasks)}")
            path = tasks[0].path
        return cls(path, args.evaluation_steps, args.evaluation_num_batch)


# Settings the ranks of one run may hold differently (RunConfig.fingerprint leaves them out), by
# config (``run``: RunConfig's own fields): where a rank is, paths and interfaces on its node,
# how it reports, what shapes its own memory only, and the run token (the fingerprint crosses the
# store in plain text).
PER_RANK: dict[str, tuple[str, ...]] = {
    "topology": ("rank",),
    "comm": ("timeout_s", "net_interface", "link_bandwidth_mbps", "link_latency_ms", "host_staging", "run_token"),
    "model": ("model_name", "tokenizer_name", "embedding_dim"),
    "checkpoint": ("path", "keep", "preempt_grace_s"),
    "generation": ("prompts", "output"),
    "run": (
        "device",
        "log_level",
        "log_interval",
        "activation_checkpointing",
        "loss_chunk_tokens",
        "log_backend",
        "project_name",
        "spare_rank",
    ),
}


@dataclass(frozen=True)
class RunConfig:
    topology: Topology
    comm: CommConfig
    model: ModelConfig
    data: DataConfig
    batch: BatchConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    evaluation: EvalConfig = EvalConfig()
    dp: DataParallelConfig = field(default_factory=DataParallelConfig)
    lora: LoraSpec | None = None  # adapters on every block, base frozen
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # sampling; a sampling-only run
    device: str = "cpu"
    log_level: str = "INFO"
    log_interval: int = 10
    pp_mode: str = "gpipe"  # | 1f1b | zb1
    activation_checkpointing: str = "none"  # | full: every block recomputes its forward in the backward
    # tokens projected to the vocabulary at a time by the loss (0: all logits; None: auto, see chunk_tokens_for)
    loss_chunk_tokens: int | None = None
    profiling: str = "no-profiling"  # | tidy_profiling | pytorch_profiling
    log_backend: str = "print"  # | wandb
    project_name: str = "dist-clm-train"
    # --spares: this process is the spare launched as --rank spare_rank; ``topology`` is a
    # placeholder (rank 0's) until it takes a lost rank's place (run.entry.stand_by)
    spare_rank: int | None = None

    @property
    def launch_rank(self) -> int:
        """This process's --rank: its name in an elastic run's store."""
        return self.topology.rank if self.spare_rank is None else self.spare_rank

    def chunk_tokens_for(self, vocab_size: int) -> int:
        """The loss's chunk: as asked, or under auto the chunked loss only where it pays. It saves
        a micro-batch's logits (twice: logits and log-softmax) for one more output projection in
        the backward, which on a small vocabulary costs more time than the memory is worth."""
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        logits = self.batch.micro_batch_size * self.data.seq_length * vocab_size * 4
        return AUTO_CHUNK_TOKENS if logits >= AUTO_CHUNK_MIB * 2**20 else 0

    def rounds_per_pass(self) -> int:
        """Accumulation rounds one pipeline pass runs. 1F1B and zb1 hold at most p - s
        micro-batches however many a pass has, so every round goes through one pass (the pipeline
        fills and drains once per step); GPipe holds its whole pass, so it keeps a pass per round."""
        return 1 if self.pp_mode == "gpipe" else self.batch.accumulate_steps

    def held_micro_batches(self, stage: int) -> int:
        """Micro-batches whose activations stage ``stage`` holds at once: GPipe its whole pass,
        1F1B p - s; zb1 p - s plus the linear layers' inputs and output gradients of the s
        backwards waiting for W, counted here as s whole micro-batches (an upper bound)."""
        per_pass = self.batch.micro_batches * self.rounds_per_pass()
        p = self.topology.pipeline_size
        return min(per_pass, {"gpipe": per_pass, "1f1b": p - stage, "zb1": p}[self.pp_mode])

    @property
    def global_batch_sequences(self) -> int:
        """Sequences per optimizer step, over all replicas and accumulation rounds."""
        return self.batch.batch_size * self.topology.data_size * self.batch.accumulate_steps

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            raise ValueError("--loss-chunk-tokens must be >= 0 (0: compute all logits at once)")
        if self.activation_checkpointing not in ("none", "full"):
            raise ValueError(f"--activation-checkpointing {self.activation_checkpointing!r} is not none or full")
        if self.lora is not None and not self.model.load_pretrained:
            raise ValueError("LoRA adapts pretrained weights: drop --load-pretrained-model false or --lora-rank")
        if self.log_interval < 1:
            raise ValueError("--log-interval must be at least 1")
        if self.dp.shard_optimizer and self.optim.optimizer == "8bit-adam":
            raise ValueError(
                "--shard-optimizer keeps fp32 AdamW moments; 8-bit AdamW's block-quantized state cannot be "
                "split and resumed across topologies: use --optimizer adamw, or drop --shard-optimizer"
            )
        self._check_elastic()
        if self.objective.pairs:
            self._check_pairs()
        elif self.data.truncation is not None:
            raise ValueError(
                f"--truncation-mode applies to preference pairs (--objective dpo or reward), not --objective "
                f"{self.objective.name}, whose examples keep their first --seq-length tokens; drop it"
            )

    def _check_pairs(self) -> None:
        """What preference pairs need: one pair's two sequences per row pair, never packed together."""
        if self.data.packing not in (None, "none"):
            raise ValueError(
                f"--packing {self.data.packing}: under --objective {self.objective.name} each sequence is one "
                "response to its prompt (packing none); drop --packing"
            )
        if self.comm.regroups and self.objective.precomputed_reference:
            raise ValueError(
                f"--objective {self.objective.name} with a precomputed reference does not run with --elastic or "
                "--spares yet (a joining replica or spare would need the reference log-probs handed over); use "
                "--dpo-reference frozen, or drop --elastic and --spares"
            )

    def _check_elastic(self) -> None:
        dp = self.topology.data_size
        if not self.comm.elastic and self.dp.min_replicas != 1:
            raise ValueError("--min-replicas applies to --elastic runs; add --elastic or drop it")
        if not self.comm.regroups:
            return
        flag = "--elastic" if self.comm.elastic else "--spares"
        if dp < 2 and self.comm.elastic:  # (a spare in a single pipeline rolls back to the last checkpoint)
            raise ValueError("--elastic needs --data-group-size 2 or more: with one replica a lost rank leaves "
                             "no pipeline to go on")  # fmt: skip
        if not 1 <= self.dp.min_replicas <= dp:
            raise ValueError(f"--min-replicas {self.dp.min_replicas} must lie in 1..--data-group-size {dp}")
        if not self.comm.dist_url.startswith("tcp://"):
            raise ValueError(f"{flag} needs a tcp://host:port --dist-url for its store (got {self.comm.dist_url})")

    def summary(self) -> dict:
        """The run's settings for experiment trackers: no paths beyond the model's, no secrets."""
        return {
            "model": self.model.model_name,
            "pipeline_stages": self.topology.pipeline_size,
            "replicas": self.topology.data_size,
            "seq_length": self.data.seq_length,
            "global_batch_sequences": self.global_batch_sequences,
            "micro_batch_size": self.batch.micro_batch_size,
            "shard_optimizer": self.dp.shard_optimizer,
            "tasks": {str(t.path.name): t.weight for t in self.data.tasks},
            **{k: v for k, v in asdict(self.optim).items()},
            **({f"lora_{k}": v for k, v in asdict(self.lora).items()} if self.lora else {}),
        }

    def fingerprint(self) -> str:
        """Hash of every setting that all ranks must share: every field of every config, except
        those PER_RANK names. Paths may differ between nodes; what they hold and how they are
        used may not (the tasks' weights, whether there is evaluation data)."""
        shared: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in PER_RANK["run"]:
                continue
            if is_dataclass(value):
                value = {k: v for k, v in asdict(value).items() if k not in PER_RANK.get(f.name, ())}
            shared[f.name] = value
        shared["data"]["tasks"] = [t.weight for t in self.data.tasks]
        shared["evaluation"]["path"] = self.evaluation.path is not None
        # the bucket size as used: ranks that left it at the default and one that named it agree
        shared["dp"]["bucket_mb"] = self.dp.bucket_bytes
        return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:16]
