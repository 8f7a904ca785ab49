"""What a run asks of its data-parallel replicas: the sync strategy, its codec and its schedule.

Declares its own flags (``add_flags``) and builds itself from the parsed arguments (``from_args``);
the command line (trainer.cli) composes it with the other configs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from comm.compress import DP_METHODS

# the file prefix of DiLoCo's outer state per part in a checkpoint (data_parallel.diloco)
OUTER_PREFIX = "outer_"
DEFAULT_BUCKET_MB = 25.0  # --dp-bucket-mb: a stage of a few hundred MB of gradients sends a dozen buckets or more


@dataclass(frozen=True)
class DataParallelConfig:
    # allreduce: gradients summed every step; local: replicas step alone and average weights
    # every sync_every steps; diloco: replicas step alone and take an outer Nesterov step on
    # their averaged pseudo-gradients every sync_every steps (data_parallel.diloco)
    mode: str = "allreduce"
    sync_every: int = 1
    compress: str = "none"  # gradient (diloco: pseudo-gradient) sum: none | fp16 | int8 | topk (error feedback)
    topk_ratio: float = 0.01
    shard_optimizer: bool = False  # ZeRO-1: AdamW state split over the replicas of a stage
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    fragments: int = 1  # diloco: parts of the model synced in turn, one every sync_every / fragments steps
    overlap_steps: int | None = None  # diloco: inner steps a sync runs beside (None: 1 if fragments > 1, else 0)
    min_replicas: int = 1  # --elastic: fewer complete replicas than this stop the run
    # allreduce: gradient buckets summed during the last backward (0: after it; None: the default
    # size, so a size given where nothing is bucketed can be refused)
    bucket_mb: float | None = None

    @property
    def steps_alone(self) -> bool:
        """Each replica steps on its own gradients (normalised by its own tokens)."""
        return self.mode in ("local", "diloco")

    @property
    def replicated(self) -> bool:
        """After every step each replica holds the stage's whole state, the same: a live replica
        can hand it to a joiner or a spare. Otherwise (ZeRO-1's shards, steps alone) a change of
        replicas goes through a checkpoint."""
        return self.mode == "allreduce" and not self.shard_optimizer

    @property
    def replica_files(self) -> bool:
        """Every replica saves its own weights and optimizer state: they differ between syncs (and
        the AdamW moments always), so a resume at any step is exact."""
        return self.steps_alone

    @property
    def side_group(self) -> bool:
        """The strategy needs a second data-parallel group (DiLoCo's syncs run beside the step's sums)."""
        return self.mode == "diloco"

    @property
    def own_bytes_per_value(self) -> int:
        """Bytes the strategy keeps per trained value beside the optimizer's (DiLoCo: the outer
        anchor and momentum, fp32 each)."""
        return 8 if self.mode == "diloco" else 0

    def optimizer_shards(self, replicas: int) -> int:
        """How many replicas share a stage's optimizer state (ZeRO-1: all of them)."""
        return replicas if self.shard_optimizer else 1

    @property
    def own_prefixes(self) -> tuple[str, ...]:
        """File prefixes of what the strategy saves per part beside the optimizer's state."""
        return (OUTER_PREFIX,) if self.mode == "diloco" else ()

    @property
    def bucket_bytes(self) -> int:
        """Bytes per gradient bucket of --dp-mode allreduce (0: one sum after the step)."""
        return int((DEFAULT_BUCKET_MB if self.bucket_mb is None else self.bucket_mb) * 2**20)

    @property
    def overlap(self) -> int:
        if self.overlap_steps is not None:
            return self.overlap_steps
        return 1 if self.fragments > 1 else 0

    def __post_init__(self) -> None:
        if self.sync_every < 1 or not 0 < self.topk_ratio <= 1:
            raise ValueError("--sync-every must be >= 1 and --dp-topk-ratio in (0, 1]")
        if self.bucket_mb is not None:
            if not self.bucket_mb >= 0:
                raise ValueError(
                    f"--dp-bucket-mb must be >= 0 (0 sums the gradients after the step), not {self.bucket_mb}"
                )
            if self.steps_alone or self.shard_optimizer:
                unbucketed = "--shard-optimizer reduce-scatters" if self.shard_optimizer else f"{self.mode} mode sums"
                raise ValueError(
                    f"--dp-bucket-mb applies to --dp-mode allreduce without --shard-optimizer; {unbucketed} "
                    "its data-parallel messages after the step: drop --dp-bucket-mb"
                )
        if self.mode == "local" and self.compress != "none":
            raise ValueError("--dp-compress applies to --dp-mode allreduce or diloco; local mode sends no gradients")
        if self.shard_optimizer and self.steps_alone:
            raise ValueError(
                f"--shard-optimizer needs --dp-mode allreduce: in {self.mode} mode each replica steps its own "
                "weights, so each needs the whole optimizer state"
            )
        if self.shard_optimizer and self.compress != "none":
            raise ValueError(
                "--shard-optimizer cannot be combined with --dp-compress: sharding all-gathers full fp32 "
                "weights every step, more bytes than compressing the gradients saves; drop one of the two"
            )
        if self.mode != "diloco":
            if self.fragments != 1 or self.overlap_steps is not None:
                raise ValueError("--diloco-fragments and --diloco-overlap-steps need --dp-mode diloco")
            return
        if self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
            raise ValueError("--outer-lr must be > 0 and --outer-momentum in [0, 1)")
        if self.fragments < 1 or self.sync_every % self.fragments:
            raise ValueError(
                f"--sync-every {self.sync_every} must be a multiple of --diloco-fragments {self.fragments} "
                "(one fragment syncs every sync_every / fragments steps)"
            )
        if not 0 <= self.overlap < self.sync_every // self.fragments:
            raise ValueError(
                f"--diloco-overlap-steps {self.overlap} must be >= 0 and below --sync-every / --diloco-fragments "
                f"= {self.sync_every // self.fragments}: a fragment's sync must land before the next one starts"
            )

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--dp-mode",
            choices=("allreduce", "local", "diloco"),
            default="allreduce",
            help="allreduce: sum gradients every step; local: replicas step alone and average their weights "
            "every --sync-every steps; diloco: replicas step alone, and every --sync-every steps average their "
            "pseudo-gradients (weights at the last sync minus now) into an outer Nesterov step (for slow links "
            "between replicas)",
        )
        group.add_argument(
            "--sync-every", type=int, default=8, help="--dp-mode local/diloco: inner steps between syncs"
        )
        group.add_argument(
            "--outer-lr", type=float, default=0.7, help="--dp-mode diloco: the outer step's learning rate"
        )
        group.add_argument("--outer-momentum", type=float, default=0.9, help="--dp-mode diloco: its Nesterov momentum")
        group.add_argument(
            "--diloco-fragments",
            type=int,
            default=1,
            help="--dp-mode diloco: streaming DiLoCo; block i belongs to fragment i %% F (embedding and head to "
            "fragment 0), and one fragment syncs every sync-every / F steps, so the link carries 1/F of the "
            "model at a time",
        )
        group.add_argument(
            "--diloco-overlap-steps",
            type=int,
            default=None,
            help="--dp-mode diloco: inner steps a sync runs beside before its outer step lands (the local "
            "progress made meanwhile is kept on top); default 1 with --diloco-fragments > 1, else 0 (blocking)",
        )
        group.add_argument(
            "--dp-compress",
            choices=DP_METHODS,
            default="none",
            help="gradient sum across replicas (diloco: pseudo-gradient sum) in fp16, int8 or top-k, with error "
            "feedback",
        )
        group.add_argument("--dp-topk-ratio", type=float, default=0.01, help="--dp-compress topk: share of values sent")
        group.add_argument(
            "--dp-bucket-mb",
            type=float,
            default=None,
            help="--dp-mode allreduce: gradients are summed over the replicas in buckets of about this size "
            f"(default {DEFAULT_BUCKET_MB:g}), each sent as soon as the step's last backward has finished it, "
            "while earlier layers still compute; 0: one sum after the step",
        )
        group.add_argument(
            "--shard-optimizer",
            action="store_true",
            help="ZeRO stage 1: each data-parallel replica keeps AdamW state for 1/dp of its stage's values; "
            "gradients are reduce-scattered and weights all-gathered (the bytes of one all-reduce)",
        )
        group.add_argument(
            "--zero-stage",
            type=int,
            choices=(0, 1),
            default=0,
            help="1 is --shard-optimizer; 0 (default) keeps the whole optimizer state on every replica",
        )
        group.add_argument(
            "--min-replicas",
            type=int,
            default=1,
            help="--elastic: stop when fewer complete replicas than this remain",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataParallelConfig:
        return cls(
            mode=args.dp_mode,
            sync_every=args.sync_every,
            compress=args.dp_compress,
            topk_ratio=args.dp_topk_ratio,
            shard_optimizer=args.shard_optimizer or args.zero_stage == 1,
            outer_lr=args.outer_lr,
            outer_momentum=args.outer_momentum,
            fragments=args.diloco_fragments,
            overlap_steps=args.diloco_overlap_steps,
            min_replicas=args.min_replicas,
            bucket_mb=args.dp_bucket_mb,
        )
