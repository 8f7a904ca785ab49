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


DP_METHODS = ("none", "fp16", "int8", "topk")
_INT8_CHUNK = 1024  # values sharing one scale in int8 gradient compression


class GradientCompressor:
    """Sends less than fp32 for the data-parallel gradient sum, with error feedback: what one
    step's compression drops is added to the next step's gradient, so it is delayed, not lost.

    ``encode`` gives this replica's payload (a few tensors of sizes fixed by the gradient's
    length); the replicas' payloads are all-gathered and ``decode_sum`` adds them up in fp32.
    """

    def __init__(self, method: str, topk_ratio: float = 0.01) -> None:
        if method not in DP_METHODS or method == "none":
            raise ValueError(f"unknown gradient compression {method!r}; choose one of {DP_METHODS}")
        self.method = method
        self.topk_ratio = topk_ratio
        self.residual: torch.Tensor | None = None
        self._before: torch.Tensor | None = None  # the residual before the last encode

    def encode(self, flat: torch.Tensor) -> list[torch.Tensor]:
        x = flat.float() + (self.residual if self.residual is not None else 0)
        if self.method == "fp16":
            payload = [x.to(torch.float16)]
        elif self.method == "int8":
            pad = (-x.numel()) % _INT8_CHUNK
            chunks = torch.nn.functional.pad(x, (0, pad)).view(-1, _INT8_CHUNK)
            scale = chunks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
            payload = [torch.round(chunks / scale).to(torch.int8), scale]
        else:
            k = max(1, int(x.numel() * self.topk_ratio))
            index = x.abs().topk(k).indices.to(torch.int32)
            payload = [x[index.long()], index]
        self._before = self.residual
        self.residual = x - self.decode_sum([payload], x.numel())  # what this step did not send
        return payload

    def rollback(self) -> None:
        """Forget the last encode (its step was skipped, e.g. for non-finite gradients)."""
        self.residual = self._before

    def decode_sum(self, payloads: list[list[torch.Tensor]], numel: int) -> torch.Tensor:
        total = torch.zeros(numel, dtype=torch.float32, device=payloads[0][0].device)
        for payload in payloads:
            if self.method == "fp16":
                total += payload[0].float()
            elif self.method == "int8":
                q, scale = payload
                total += (q.float() * scale).reshape(-1)[:numel]
            else:
                values, index = payload
                total.index_add_(0, index.long(), values.float())
        return total
