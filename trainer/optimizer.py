"""A stage's optimizer: AdamW (or bitsandbytes' 8-bit AdamW) over what its data-parallel strategy
says to step (data_parallel), clipped by the norm over every stage and replica."""

from __future__ import annotations

import re

import torch
from torch import nn

from data_parallel.base import GradientSync
from pipeline.schedule import GradientWatch
from trainer.config import OptimConfig

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
