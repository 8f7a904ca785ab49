"""Mixed precision: which dtypes compute and travel, and fp16's dynamic loss scale.

Weights, gradients and optimizer state stay fp32 (the master copy); fp16/bf16 only run the
forward under autocast and carry activations between stages at half the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MASTER_DTYPE = torch.float32  # weights, gradients, optimizer state and the residual stream


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    return None if precision == "fp32" else DTYPES[precision]


@dataclass
class LossScaler:
    """Dynamic loss scale for fp16: halve it on overflow, double it after a run of good steps.

    The trainer decides "overflow" from the gradient norm summed over all stages after the
    data-parallel sum, which every rank sees alike; so every stage and replica skips together.
    """

    scale: float = 2.0**16
    growth_interval: int = 1000
    good_steps: int = 0
    floor: float = 1.0  # below 1 the scale would shrink gradients instead of lifting them

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale = max(self.floor, self.scale / 2)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]
