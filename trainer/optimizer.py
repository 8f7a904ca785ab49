"""A stage's optimizer: AdamW (or bitsandbytes' 8-bit AdamW) over what its data-parallel strategy
says to step (data_parallel), clipped by the norm over every stage and replica."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch
from torch import nn

from data_parallel.base import GradientSync
from pipeline.schedule import GradientWatch


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    precision: str = "fp32"  # fp32 | fp16 | bf16
    loss_scale: float = 2.0**16  # fp16's first loss scale
    max_nonfinite_steps: int = 3  # consecutive non-finite steps before stopping (fp16: at the scale's floor)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"unknown precision {self.precision!r}")
        if self.loss_scale < 1 or self.max_nonfinite_steps < 1:
            raise ValueError("--loss-scale-init and --max-nonfinite-steps must be >= 1")
        if self.total_steps < 1:
            raise ValueError("--total-steps must be at least 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must lie in 0..--total-steps {self.total_steps}")
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if self.max_grad_norm < 0:
            raise ValueError("--max-grad-norm must be >= 0 (0 turns clipping off)")

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--optimizer",
            choices=("adamw", "adam", "8bit-adam"),
            default="adamw",
            help="adam is an alias of adamw; 8bit-adam needs bitsandbytes",
        )
        group.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
        group.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps, then linear decay to 0")
        group.add_argument("--total-steps", type=int, default=1000, help="optimizer steps in the whole run")
        group.add_argument(
            "--weight-decay",
            type=float,
            default=0.0,
            help="AdamW's decoupled weight decay, on every trained weight but biases and norms (as HF's Trainer)",
        )
        group.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
        precision = group.add_mutually_exclusive_group()
        precision.add_argument("--fp16", action="store_true", help="fp16 autocast, fp32 master weights, loss scaling")
        precision.add_argument("--bf16", action="store_true", help="bf16 autocast, fp32 master weights")
        group.add_argument("--loss-scale-init", type=float, default=2.0**16, help="fp16: first loss scale")
        group.add_argument(
            "--max-nonfinite-steps",
            type=int,
            default=3,
            help="stop after N non-finite steps in a row (fp16: N overflows at the smallest loss scale)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimConfig:
        return cls(
            lr=args.lr,
            total_steps=args.total_steps,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            optimizer=args.optimizer,
            precision="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
            loss_scale=args.loss_scale_init,
            max_nonfinite_steps=args.max_nonfinite_steps,
        )

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (1-based): linear warmup, then linear decay to 0."""
        k = step - 1
        if k < self.warmup_steps:
            return self.lr * k / max(1, self.warmup_steps)
        return self.lr * max(0.0, (self.total_steps - k) / max(1, self.total_steps - self.warmup_steps))


# HF's Trainer (and so TRL) exempts from weight decay the parameters whose name says bias or norm,
# and every parameter of an nn.LayerNorm: the same names here, since a stage's blocks are HF's
# own modules and its ends keep HF's attribute names (``head.norm``, ``head.ln_f``, ...)
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decayed_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s parameters that weight decay applies to, by HF Trainer's rule:
    not a bias, not a norm's weight (by name), not inside an nn.LayerNorm. One rule for full
    fine-tuning and LoRA (adapters and a reward model's score head decay, as under HF's Trainer)."""
    exempt = {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        if isinstance(sub, nn.LayerNorm)
        for name, _ in sub.named_parameters()
    }
    return {name for name, _ in module.named_parameters() if name not in exempt and not _NO_DECAY.search(name.lower())}


def make_optimizer(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (``adam`` is its alias) or bitsandbytes' 8-bit AdamW, imported only when asked for,
    over parameter ``groups`` (each with its weight decay)."""
    kwargs = {"lr": cfg.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if cfg.optimizer != "8bit-adam":
        # Fused: one kernel per tensor instead of about ten passes over it and no temporaries
        # (measured 8x faster on the CPU); the same AdamW, to float rounding. Its step counts
        # live on the parameters' device.
        return torch.optim.AdamW(groups, **kwargs, fused=any(group["params"] for group in groups))
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("--optimizer 8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit(groups, **kwargs)


def adamw_temporaries(optimizer: torch.optim.Optimizer, sizes: list[int]) -> int:
    """Bytes AdamW allocates for a moment while it steps parameters of ``sizes`` bytes: fused,
    nothing; torch's multi-tensor kernels (CUDA's default otherwise) a square-root copy of every
    moment at once; one tensor at a time, two of that tensor's size."""
    if not sizes or optimizer.defaults.get("fused"):
        return 0
    return sum(sizes) if optimizer.defaults.get("foreach") else 2 * max(sizes)


class StageOptimizer:
    """The optimizer of one stage and the strategy (``sync``) its gradients go through first."""

    def __init__(self, cfg: OptimConfig, sync: GradientSync) -> None:
        self.sync = sync
        self.inner = make_optimizer(cfg, sync.param_groups(cfg.weight_decay))
        sync.attach(self.inner)
        moment_bytes = 2 if cfg.optimizer == "8bit-adam" else 8
        # the state it will hold once stepped, and what the sum and the update allocate for a
        # moment, by their own count
        self.state_bytes = moment_bytes * sum(p.numel() for p in sync.stepped) + sync.own_state_bytes
        self.update_bytes = max(sync.sum_bytes, adamw_temporaries(self.inner, [p.nbytes for p in sync.stepped]))

    @property
    def sharded(self) -> bool:
        return self.sync.sharded

    def held_bytes(self) -> int:
        """Bytes of optimizer state this rank holds now, counted tensor by tensor."""
        return sum(v.nbytes for state in self.inner.state.values() for v in state.values() if torch.is_tensor(v))

    def zero_grad(self) -> None:
        self.sync.zero_grad()

    def overlap(self, scale: float) -> GradientWatch | None:
        """What the step's last pipeline pass tells as it finishes gradients (None: nothing listens)."""
        return self.sync.during_backward(scale)

    def reduce(self, totals: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's totals summed over the replicas and this stage's squared gradient norm
        (data_parallel.base.GradientSync.reduce)."""
        return self.sync.reduce(totals, scale)

    def rollback(self) -> None:
        self.sync.rollback()

    def step(self, lr: float, clip: float | None) -> None:
        """Clip by ``clip`` (the coefficient from the norm over every stage), step at ``lr``."""
        if clip is not None:
            torch._foreach_mul_([p.grad for p in self.sync.stepped], clip)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.sync.before_update(lr)
        self.inner.step()
        self.sync.after_update()

    def state_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self.sync.state_tensors(module)

    def load_state_tensors(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.sync.load_state_tensors(module, tensors)
