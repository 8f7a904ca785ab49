"""Deferred weight gradients: the backward split into B and W for the zero-bubble schedule.

A linear layer's backward is two matmuls of equal size: the input gradient ``dx = dy @ w``
(B: the previous stage waits for it) and the weight gradient ``dw = dy.T @ x`` (W: nobody
waits for it before the optimizer step). With the store collecting, the trained linear layers
of a stage compute only ``dx`` in the backward and queue a closure that forms ``dw`` (and the
bias gradient) later; the schedule runs a micro-batch's queue in a bubble. Everything else
(attention, norms, the embedding, the chunked loss) keeps its whole backward in B.

    forward   y = x @ w.T + b         saves x and w (cast as autocast would)
    B         dx = dy @ w             queues (x, dy) for W
    W         w.grad += dy.T @ x      b.grad += dy.sum(tokens)     (fp32: one addmm_, no dw tensor)

Weight gradients add up in micro-batch order as in GPipe; only float rounding may differ
(e.g. a tied weight's two uses now reach ``.grad`` in two additions, not one, and the GEMM
adds into ``.grad`` where autograd adds a finished product).
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

STORE_ATTRIBUTE = "_deferred_weight_grads"
# One layer's W: the parameters it adds to, and the closure that adds
Accumulation = tuple[tuple[nn.Parameter, ...], Callable[[], None]]


class DeferredWeightGrads:
    """The queued weight gradients of one stage: one list of closures per backward, run in order."""

    def __init__(self) -> None:
        self.collecting: list[Accumulation] | None = None  # the backward in progress
        self.pending: deque[list[Accumulation]] = deque()  # backwards whose W has not run
        self.params: set[nn.Parameter] = set()  # those whose gradients W forms (weights and trained biases)

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """A backward run inside queues its linear layers' weight gradients as one W."""
        self.collecting = []
        try:
            yield
        finally:
            self.pending.append(self.collecting)
            self.collecting = None

    def run_oldest(self, accumulated: Callable[[tuple[nn.Parameter, ...]], None] | None = None) -> None:
        """W of the oldest backward still pending: its weight gradients reach ``.grad``, in the
        order the backward met the layers; ``accumulated`` hears of each layer's parameters."""
        with torch.no_grad():  # as autograd's own accumulation: nothing here is differentiated
            for params, accumulate in self.pending.popleft():
                accumulate()
                if accumulated is not None:
                    accumulated(params)


def deferred_weight_grads(stage: nn.Module) -> DeferredWeightGrads:
    """The store of ``stage``, created the first time: each ``nn.Linear`` (and GPT-2's
    ``Conv1D``) with a trained weight gets a forward whose backward can defer ``dw``. Outside
    ``deferring()`` that backward forms ``dw`` at once, so the stage trains as before anywhere."""
    store = getattr(stage, STORE_ATTRIBUTE, None)
    if store is None:
        store = DeferredWeightGrads()
        for module in stage.modules():
            transposed = type(module).__name__ == "Conv1D"  # y = x @ w + b, w stored (in, out)
            if (isinstance(module, nn.Linear) or transposed) and module.weight.requires_grad:
                module.forward = types.MethodType(_deferred_forward(store, transposed), module)
                store.params.add(module.weight)
                if module.bias is not None and module.bias.requires_grad:
                    store.params.add(module.bias)
        setattr(stage, STORE_ATTRIBUTE, store)
    return store


def _deferred_forward(store: DeferredWeightGrads, transposed: bool) -> Callable:
    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _DeferredLinear.apply(x, module.weight, module.bias, store, transposed)

    return forward


class _DeferredLinear(torch.autograd.Function):
    """``F.linear`` (or ``x @ w + b`` when ``transposed``) whose weight gradient may wait."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        store: DeferredWeightGrads,
        transposed: bool,
    ) -> torch.Tensor:
        # Under autocast nn.Linear computes in the autocast dtype and saves the cast tensors;
        # cast here the same way, so the saved tensors and the result are the same.
        ctx.params, ctx.input_dtype = (weight, bias), x.dtype  # the leaves whose .grad W adds to
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        w = weight.t() if transposed else weight  # (out, in)
        with torch.autocast(device, enabled=False):
            y = F.linear(x, w, bias)  # (..., out)
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.transposed = store, transposed
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = grad.to(x.dtype)
        grad_x = None
        if need_x:
            grad_x = (grad @ (weight.t() if ctx.transposed else weight)).to(ctx.input_dtype)  # (..., in)
        if not (need_weight or need_bias):
            return grad_x, None, None, None, None
        params, transposed = ctx.params, ctx.transposed  # the closures below must not hold ctx
        dy, inputs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (tokens, out), (tokens, in)

        def weight_grads() -> tuple[torch.Tensor | None, torch.Tensor | None]:
            dw = (inputs.t() @ dy if transposed else dy.t() @ inputs) if need_weight else None
            db = dy.sum(0) if need_bias else None
            return dw, db

        if ctx.store.collecting is None:  # not deferring: autograd accumulates them now
            grads = weight_grads()
            return (grad_x, *(g.to(p.dtype) if g is not None else None for p, g in zip(params, grads, strict=True)),
                    None, None)  # fmt: skip

        def accumulate() -> None:
            weight = params[0]
            if need_weight and weight.grad is not None and weight.grad.dtype == dy.dtype:
                # one GEMM adds dw into .grad (beta = 1): no dw of its own and no second pass over
                # it, as autograd's accumulation would make; something a generic split cannot do
                weight.grad.addmm_(inputs.t(), dy) if transposed else weight.grad.addmm_(dy.t(), inputs)
                grads = (None, dy.sum(0) if need_bias else None)
            else:
                grads = weight_grads()
            for param, value in zip(params, grads, strict=True):
                if value is None:
                    continue
                if param.grad is None:
                    param.grad = value.to(param.dtype)
                else:
                    param.grad.add_(value)

        ctx.store.collecting.append((tuple(p for p in params if p is not None), accumulate))
        return grad_x, None, None, None, None
