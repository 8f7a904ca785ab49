"""Next-token cross-entropy of a micro-batch, with or without the vocabulary-sized logits.

``token_loss`` takes the logits: the head computed them, autograd keeps them (and the
log-softmax) for the backward, micro x seq x vocab values each. ``chunked_token_loss`` takes the
final norm's output and the head's output layer instead, and projects a chunk of tokens at a
time: the forward keeps only the hidden states (and the targets), and the backward
projects each chunk again to form its gradient. On a 50k vocabulary that is a few MB per
micro-batch instead of hundreds, for one more head matmul in the backward.

Both return the summed loss over the trained tokens divided by ``normalizer`` (the global
batch's trained-token count; over fp16's loss scale, which multiplies the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.stream import IGNORE_INDEX
from modules.common import soft_cap


def token_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: float) -> torch.Tensor:
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1].reshape(-1, vocab).float()  # position t predicts token t+1
    shifted_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / normalizer


def chunked_token_loss(
    hidden: torch.Tensor,
    output: nn.Linear,
    labels: torch.Tensor,
    normalizer: float,
    chunk: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """``token_loss(soft_cap(output(hidden), softcap), labels, normalizer)`` with ``chunk`` tokens'
    logits at a time."""
    dim = hidden.shape[-1]
    shifted = hidden[:, :-1].reshape(-1, dim)  # (tokens, hidden): position t predicts token t+1
    targets = labels[:, 1:].reshape(-1)
    return _ChunkedHeadLoss.apply(shifted, output.weight, output.bias, targets, float(normalizer), chunk, softcap)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _target_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    softcap: float | None, temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Each row's log-probability of its target (any value where the target is IGNORE_INDEX),
    under the logits divided by ``temperature`` (the sampling's, where RL scores its samples)."""
    logits = soft_cap(F.linear(hidden, weight, bias), softcap).float()  # (chunk, vocab)
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax, not logsumexp - logit: a confident token's loss is a small difference of
    # two large numbers (real models' logits reach 20-30), which fp32 would round away
    return F.log_softmax(logits, dim=-1).gather(1, targets.clamp_min(0)[:, None]).squeeze(1)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk both ways."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        normalizer: float,
        chunk: int,
        softcap: float | None,
    ) -> torch.Tensor:
        # under autocast the projection runs in its dtype (as nn.Linear would); the rest in fp32
        ctx.compute_dtype = _autocast_dtype(hidden.device.type)
        valid = targets != IGNORE_INDEX
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk):
            rows = slice(start, start + chunk)
            total -= (_target_logps(hidden[rows], weight, bias, targets[rows], softcap) * valid[rows]).sum()
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.normalizer, ctx.chunk, ctx.softcap, ctx.temperature = normalizer, chunk, softcap, 1.0
        return total / normalizer

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        hidden, weight, bias, targets = ctx.saved_tensors
        valid = targets != IGNORE_INDEX
        # d(-log_softmax[target]) / d logits = softmax - one-hot, for trained tokens only
        weights = valid * (grad_out.float() / ctx.normalizer)
        return (*_head_backward(ctx, hidden, weight, bias, targets, weights), None, None, None, None)


def token_logps(
    out: torch.Tensor, labels: torch.Tensor, output: nn.Linear | None = None, chunk: int = 0,
    softcap: float | None = None, temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Each position's log-probability of the next token where that token is trained (0
    elsewhere), (rows, seq - 1) in fp32: from the logits ``out``, or with ``output`` from the final
    norm's output ``out``, ``chunk`` tokens' logits at a time (as ``chunked_token_loss``; the
    backward projects each chunk again); the logits divided by ``temperature``."""
    rows, seq = labels.shape
    targets = labels[:, 1:].reshape(-1)
    if output is None:
        logits = out[:, :-1].float()
        picked = F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
        picked = picked.reshape(-1, out.shape[-1]).gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
        picked = picked * (targets != IGNORE_INDEX)
    else:
        shifted = out[:, :-1].reshape(-1, out.shape[-1])
        picked = _ChunkedTokenLogps.apply(shifted, output.weight, output.bias, targets, chunk, softcap, temperature)
    return picked.reshape(rows, seq - 1)


def sequence_logps(
    out: torch.Tensor, labels: torch.Tensor, output: nn.Linear | None = None, chunk: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Each sequence's summed log-probability of its trained tokens, (rows,) in fp32 (``token_logps``)."""
    return token_logps(out, labels, output, chunk, softcap).sum(1)


class _ChunkedTokenLogps(torch.autograd.Function):
    """Each token's log-probability of its target under ``hidden @ weight.T + bias`` (0 where
    the target is IGNORE_INDEX), ``chunk`` tokens at a time both ways."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        softcap: float | None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        ctx.compute_dtype = _autocast_dtype(hidden.device.type)
        valid = targets != IGNORE_INDEX
        picked = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk):
            rows = slice(start, start + chunk)
            picked[rows] = _target_logps(hidden[rows], weight, bias, targets[rows], softcap, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.softcap, ctx.temperature = chunk, softcap, temperature
        return picked * valid

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        hidden, weight, bias, targets = ctx.saved_tensors
        # d log_softmax[target] / d logits = one-hot - softmax: the loss's form, negated
        weights = (targets != IGNORE_INDEX) * -grad_out.float()
        return (*_head_backward(ctx, hidden, weight, bias, targets, weights), None, None, None, None)


def _head_backward(
    ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    targets: torch.Tensor, weights: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Gradients of hidden, weight and bias for ``sum(weights * -log_softmax(logits)[target])``,
    the logits formed again ``ctx.chunk`` tokens at a time (under ``ctx.compute_dtype``)."""
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
    device = hidden.device.type
    temperature = ctx.temperature
    autocast = torch.autocast(device, dtype=ctx.compute_dtype, enabled=ctx.compute_dtype is not None)
    for start in range(0, targets.numel(), ctx.chunk):
        rows = slice(start, start + ctx.chunk)
        with autocast:
            logits = F.linear(hidden[rows], weight, bias)  # the forward's values again
            capped = soft_cap(logits, ctx.softcap).float()
        # softmax - one-hot, each row times its weight; the softmax as autograd's log_softmax
        # gives it (exact for a confident token's p ~ 1); through a temperature, over it
        grad_logits = F.log_softmax(capped / temperature if temperature != 1.0 else capped, dim=-1).exp_()
        grad_logits[torch.arange(grad_logits.shape[0], device=hidden.device), targets[rows].clamp_min(0)] -= 1
        grad_logits.mul_(weights[rows][:, None] / temperature if temperature != 1.0 else weights[rows][:, None])
        if ctx.softcap is not None:  # through cap * tanh(z / cap): times 1 - tanh^2, as autograd does
            tanh = torch.tanh(logits.float() / ctx.softcap)
            grad_logits = grad_logits.mul_(ctx.softcap).mul_(1 - tanh * tanh).div_(ctx.softcap)
        with autocast:
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight and ctx.compute_dtype is None:
                grad_weight.addmm_(grad_logits.T, hidden[rows])  # no (vocab, hidden) temporary
            elif need_weight:
                grad_weight += grad_logits.T @ hidden[rows]
        if need_bias:
            grad_bias += grad_logits.sum(0)
    weight_grad = grad_weight.to(weight.dtype) if need_weight else None
    bias_grad = grad_bias.to(bias.dtype) if need_bias else None
    return grad_hidden, weight_grad, bias_grad
