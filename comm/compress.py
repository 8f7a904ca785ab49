"""How a tensor crosses a link: as is, cast to 16 bits, or quantised to int8/int4.

Quantised, each token's vector (the last dimension) travels as:

    outliers  its K values of largest magnitude, exactly: positions (int16/int32) and fp32 values
    the rest  in groups of G channels, q = round(x / s) in [-L, L] with s = max|x| / L per group
              (bf16 scales; int8: L = 127; int4: L = 7, two values packed per byte)

LLaMA-family hidden states carry a few channels 100-1000x larger than the rest. With one scale
per token such a channel sets the step for all the others, and at int4 they all round to zero;
sent apart, it costs K x 6 bytes a token, and the groups confine any other large value to G
channels. The defaults (K = 2, G = 32) follow the models: LLaMA-2 7B and 13B carry two such
channels, and groups of 32 are what a real model's activations need at int4 (docs/codecs.md); at
hidden 4096 the scales and outliers add 13% to int4's bytes.

Gradients round stochastically (``stochastic``): floor(x / s + u), u uniform in [0, 1), is
unbiased, so what one micro-batch rounds away is not added up again over the steps. They carry
no exact outliers: the massive channels are a property of the hidden states, whose gradients
there are as small as anywhere (RMSNorm divides by a norm those channels dominate), so K x 6
bytes a token would buy nothing; a rare large gradient stays confined to its group.

A codec turns one tensor into a few "wire" tensors of shapes fixed by the tensor's shape, so
the receiver can size its buffers without a header (Gloo needs exact sizes).
"""

from __future__ import annotations

import math

import torch

CODECS = ("none", "fp16", "bf16", "int8", "int4")
# Channels sharing one scale (the last group is shorter where it does not divide). 32: on a real
# model's hidden states (SmolLM2-135M, hidden 576, docs/codecs.md) int4 stays within 0.3% of
# fp32's loss a step with groups of 32, where 128 drifts by up to 1.2%; 8% more bytes than 128.
GROUP = 32
OUTLIERS = 2  # activation values per token sent exactly (gradients: none)


def gradient_codec_for(activations: str) -> str:
    """The default for gradients coming back over a link whose activations use ``activations``:
    the same link is slow both ways. 16-bit activations: their gradients in the same 16 bits;
    int8/int4: int8 (int4 is too coarse for gradients)."""
    return {"int8": "int8", "int4": "int8"}.get(activations, activations)


class Codec:
    """``none``: the tensor as is. ``fp16``/``bf16``: cast for the trip. ``int8``/``int4``:
    quantised as the module docstring says, ``group`` channels a scale (0: one scale per token)
    and ``outliers`` values a token sent exactly."""

    def __init__(
        self, name: str = "none", group: int = GROUP, outliers: int = OUTLIERS, stochastic: bool = False
    ) -> None:
        if name not in CODECS:
            raise ValueError(f"unknown compression {name!r}; choose one of {CODECS}")
        if group < 0 or outliers < 0:
            raise ValueError("--pp-compress-group and --pp-compress-outliers must be >= 0")
        self.name, self.group, self.outliers, self.stochastic = name, group, outliers, stochastic

    @property
    def quantised(self) -> bool:
        return self.name in ("int8", "int4")

    def _layout(self, dim: int) -> tuple[int, int, int, torch.dtype]:
        """(channels per scale, scales per token, outliers per token, their index dtype) for
        vectors of ``dim``. A group that does not divide ``dim`` leaves a shorter last group
        (576 in groups of 128: four of 128 and one of 64), never one scale a token."""
        group = min(self.group, dim) if self.group else dim
        return group, -(-dim // group), min(self.outliers, dim), torch.int16 if dim <= 2**15 else torch.int32

    def wire(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the wire tensors for a tensor of ``shape``/``dtype``."""
        if self.name == "none":
            return [(shape, dtype)]
        if self.name in ("fp16", "bf16"):
            return [(shape, torch.float16 if self.name == "fp16" else torch.bfloat16)]
        *tokens, dim = shape
        if self.name == "int4" and dim % 2:
            raise ValueError(f"int4 packs two values a byte: the last dimension ({dim}) must be even")
        _, groups, k, index_dtype = self._layout(dim)
        values = (*tokens, dim) if self.name == "int8" else (*tokens, dim // 2)
        wire = [(values, torch.int8 if self.name == "int8" else torch.uint8), ((*tokens, groups), torch.bfloat16)]
        if k:
            wire += [((*tokens, k), index_dtype), ((*tokens, k), torch.float32)]
        return wire

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.name == "none":
            return [x.contiguous()]
        if self.name in ("fp16", "bf16"):
            return [x.to(torch.float16 if self.name == "fp16" else torch.bfloat16).contiguous()]
        levels = 127 if self.name == "int8" else 7
        x = x.float()
        *tokens, dim = x.shape
        group, count, k, index_dtype = self._layout(dim)
        extra = []
        if k:  # the largest values travel exactly; the groups quantise what is left
            index = x.abs().topk(k, dim=-1).indices  # (..., k)
            extra = [index.to(index_dtype), x.gather(-1, index)]
            x = x.scatter(-1, index, 0.0)
        # zeros fill a short last group up (they change no group's largest value) and are dropped
        groups = torch.nn.functional.pad(x, (0, count * group - dim)).reshape(*tokens, count, group)
        scale = (groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / levels).to(torch.bfloat16)
        q = groups / scale.float()
        q = torch.floor(q + torch.rand_like(q)) if self.stochastic else torch.round(q)
        q = q.clamp_(-levels, levels).reshape(*tokens, count * group)[..., :dim]  # clamp: bf16 may round a scale down
        scales = scale.squeeze(-1).contiguous()  # (..., groups)
        if self.name == "int8":
            return [q.to(torch.int8), scales, *extra]
        nibbles = (q + 8).to(torch.uint8)  # 1..15
        return [(nibbles[..., 0::2] << 4 | nibbles[..., 1::2]).contiguous(), scales, *extra]

    def decode(self, wire: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if not self.quantised:
            return wire[0].to(dtype)
        packed, scales, *extra = wire
        if self.name == "int8":
            q = packed.float()
        else:
            high = (packed >> 4).to(torch.int16) - 8
            low = (packed & 0xF).to(torch.int16) - 8
            q = torch.stack((high, low), dim=-1).flatten(-2).float()  # re-interleave: even, odd, even, ...
        *tokens, dim = q.shape
        group, count, _, _ = self._layout(dim)
        q = torch.nn.functional.pad(q, (0, count * group - dim)).reshape(*tokens, count, group)
        x = (q * scales.float().unsqueeze(-1)).reshape(*tokens, count * group)[..., :dim]
        if extra:
            index, values = extra
            x = x.scatter(-1, index.long(), values)
        return x.to(dtype)


DP_METHODS = ("none", "fp16", "int8", "topk")
_INT8_CHUNK = 1024  # values sharing one scale in int8 gradient compression


class GradientCompressor:
    """Sends less than fp32 for the data-parallel gradient sum, with error feedback: what one
    step's compression drops is added to the next step's gradient, so it is delayed, not lost.

    Two replicas all-gather: ``encode`` gives this replica's payload (a few tensors of sizes
    fixed by the gradient's length), and ``decode_sum`` adds the replicas' payloads up in fp32;
    each replica sends its payload once. More replicas would each send n - 1 payloads that way,
    so they sum in two rounds of 1/n-sized chunks instead (a compressed reduce-scatter and
    all-gather): ``encode_parts`` cuts the gradient into n chunks, replica i receives every
    replica's chunk i (an all-to-all) and adds them up, ``encode_chunk_sum`` compresses that
    sum again (with an error feedback of its own, kept by the chunk's owner), and the n
    compressed sums are all-gathered. Each replica then sends 2 (n - 1) / n of one payload,
    whatever n is.
    """

    def __init__(self, method: str, topk_ratio: float = 0.01) -> None:
        if method not in DP_METHODS or method == "none":
            raise ValueError(f"unknown gradient compression {method!r}; choose one of {DP_METHODS}")
        self.method = method
        self.topk_ratio = topk_ratio
        self.residual: torch.Tensor | None = None
        self.chunk_residual: torch.Tensor | None = None  # what the sum of this replica's chunk dropped
        self._before: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # before the last step

    def encode(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """This replica's whole gradient, with its error feedback, as one payload."""
        self._before = (self.residual, self.chunk_residual)
        payload, self.residual = self._encode_with_feedback(flat.float(), self.residual)
        return payload

    def chunk_length(self, numel: int, parts: int) -> int:
        """Values in each of ``parts`` equal chunks of ``numel`` (int8: whole scale blocks)."""
        unit = _INT8_CHUNK if self.method == "int8" else 1
        return math.ceil(numel / (parts * unit)) * unit

    def encode_parts(self, flat: torch.Tensor, parts: int) -> list[list[torch.Tensor]]:
        """This replica's gradient with its error feedback, zero-padded and cut into ``parts``
        equal chunks, one payload each (payload i is for replica i to sum)."""
        self._before = (self.residual, self.chunk_residual)
        length = self.chunk_length(flat.numel(), parts)
        x = torch.nn.functional.pad(flat.float(), (0, parts * length - flat.numel()))
        if self.residual is not None:
            x += self.residual
        payloads = [self._encode(x[i * length : (i + 1) * length]) for i in range(parts)]
        self.residual = x - torch.cat([self.decode_sum([p], length) for p in payloads])
        return payloads

    def encode_chunk_sum(self, summed: torch.Tensor) -> list[torch.Tensor]:
        """The sum of this replica's chunk, compressed again for the all-gather."""
        payload, self.chunk_residual = self._encode_with_feedback(summed, self.chunk_residual)
        return payload

    def mark(self) -> None:
        """A step starts: what ``rollback`` returns to if it is given up before any encode."""
        self._before = (self.residual, self.chunk_residual)

    def rollback(self) -> None:
        """Forget the last step's encodes (it was skipped, e.g. for non-finite gradients, or given
        up: back to its ``mark`` when it encoded nothing)."""
        self.residual, self.chunk_residual = self._before

    def _encode_with_feedback(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``x`` plus what the last encode dropped, encoded; and what this one drops."""
        if residual is not None:
            x = x + residual
        payload = self._encode(x)
        return payload, x - self.decode_sum([payload], x.numel())

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.method == "fp16":
            return [x.to(torch.float16)]
        if self.method == "int8":
            pad = (-x.numel()) % _INT8_CHUNK
            chunks = torch.nn.functional.pad(x, (0, pad)).view(-1, _INT8_CHUNK)
            scale = chunks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
            return [torch.round(chunks / scale).to(torch.int8), scale]
        k = max(1, int(x.numel() * self.topk_ratio))
        index = x.abs().topk(k).indices.to(torch.int32)
        return [x[index.long()], index]

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
