"""How a tensor crosses a link: as is, cast to 16 bits, or quantised to int8/int4 per token.

    int8:  q = round(x / s) in [-127, 127],  s = max|x| / 127 over the last dimension (one token)
    int4:  q in [-7, 7], two values packed per byte; s = max|x| / 7

A codec turns one tensor into a few "wire" tensors of shapes fixed by the tensor's shape, so
the receiver can size its buffers without a header (Gloo needs exact sizes).
"""

from __future__ import annotations

import torch

CODECS = ("none", "fp16", "bf16", "int8", "int4")


class Codec:
    """``none``: the tensor as is. ``fp16``/``bf16``: cast for the trip."""

    def __init__(self, name: str = "none") -> None:
        if name not in CODECS:
            raise ValueError(f"unknown compression {name!r}; choose one of {CODECS}")
        self.name = name

    def wire(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the wire tensors for a tensor of ``shape``/``dtype``."""
        if self.name == "none":
            return [(shape, dtype)]
        if self.name in ("fp16", "bf16"):
            return [(shape, torch.float16 if self.name == "fp16" else torch.bfloat16)]
        tokens = (*shape[:-1], 1)
        if self.name == "int8":
            return [(shape, torch.int8), (tokens, torch.float32)]
        if shape[-1] % 2:
            raise ValueError(f"int4 packs two values a byte: the last dimension ({shape[-1]}) must be even")
        return [((*shape[:-1], shape[-1] // 2), torch.uint8), (tokens, torch.float32)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.name == "none":
            return [x.contiguous()]
        if self.name in ("fp16", "bf16"):
            return [x.to(torch.float16 if self.name == "fp16" else torch.bfloat16).contiguous()]
        levels = 127 if self.name == "int8" else 7
        x = x.float()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels  # (..., 1): one per token
        q = torch.round(x / scale).clamp_(-levels, levels)
        if self.name == "int8":
            return [q.to(torch.int8), scale]
        nibbles = (q + 8).to(torch.uint8)  # 1..15
        return [(nibbles[..., 0::2] << 4 | nibbles[..., 1::2]).contiguous(), scale]

    def decode(self, wire: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if self.name in ("none", "fp16", "bf16"):
            return wire[0].to(dtype)
        packed, scale = wire
        if self.name == "int8":
            return (packed.float() * scale).to(dtype)
        high = (packed >> 4).to(torch.int16) - 8
        low = (packed & 0xF).to(torch.int16) - 8
        q = torch.stack((high, low), dim=-1).flatten(-2)  # re-interleave: even, odd, even, ...
        return (q.float() * scale).to(dtype)
