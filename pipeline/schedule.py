"""Pipeline schedules. Each is one loop for every stage: the communicator's helpers return
``None`` / do nothing at the pipeline ends, so the first stage reads its input from the
micro-batch, the last turns its output into the loss, and nothing else differs.

GPipe: all forwards, then all backwards (activations of all m micro-batches are held):

    stage 0:  F0 F1 F2 F3 . . . . . . . . B0 B1 B2 B3
    stage 1:     F0 F1 F2 F3 B0 B1 B2 B3

1F1B: after p-1-s warm-up forwards, stage s alternates one forward and one backward, so it
holds at most p-s micro-batches' activations; gradients add up in the same order as GPipe's:

    stage 0:  F0 F1 .  B0 F2 B1 F3 B2 . B3
    stage 1:     F0 B0 F1 B1 F2 B2 F3 B3

zb1 (ZB-H1, Qi et al. 2024): 1F1B with each backward split into B, the input gradient the
previous stage waits for, and W, the weight gradients nobody waits for; stage s runs each W
s backwards late. With F, B and W of equal length the bubble is a third of 1F1B's, for the same
held activations (at most p - s micro-batches, plus s micro-batches' linear inputs and output
gradients waiting for W) and the same traffic:

    stage 0:  F0 F1 .  B0 W0 F2 B1 W1 F3 B2 W2 B3 W3
    stage 1:     F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from comm.process_group import Communicator
from pipeline.weight_grad import DeferredWeightGrads, deferred_weight_grads


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor | None  # (micro, seq) on the first stage, else None
    labels: torch.Tensor | None  # (micro, seq) on the last stage, else None


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GradientWatch(Protocol):
    """Hears when a step's gradients become final, to send each to the other replicas while the
    rest of the backward runs (trainer.grad_buckets). Given to the step's last pipeline pass."""

    def arm(self, deferred: Collection[torch.Tensor]) -> None:
        """The last backward (B) begins: every gradient autograd accumulates from now on is
        final, except those of ``deferred``, whose weight gradients W forms later."""

    def accumulated(self, params: tuple[torch.Tensor, ...]) -> None:
        """The last W has added these parameters' share: their gradients are final."""


@dataclass
class StepSpec:
    """What every micro-batch of a step shares."""

    activation_shape: tuple[int, ...]  # (micro, seq, hidden)
    activation_dtype: torch.dtype  # how activations and their gradients travel
    loss_fn: LossFn
    train: bool = True  # False: forwards only, without autograd (evaluation)
    compute_dtype: torch.dtype | None = None  # fp16/bf16 autocast over fp32 weights
    # The residual stream's dtype inside a stage. Under autocast a single model carries it in
    # fp32 (each block adds its 16-bit output to an fp32 stream); a received activation goes
    # back to it, so only the link carries 16 bits, not every later block.
    carry_dtype: torch.dtype = torch.float32
    watch: GradientWatch | None = None  # told of the last backward's gradients as they are formed


class _Runner:
    """Forward and backward of one micro-batch on this stage; the losses it saw. With
    ``weights`` a backward is B only, and ``weights(i)`` is micro-batch i's W. Backwards run in
    micro-batch order in every schedule, so the last of ``micro_batches`` finishes the gradients."""

    def __init__(
        self, stage: nn.Module, comm: Communicator, spec: StepSpec, micro_batches: int,
        weights: DeferredWeightGrads | None = None,
    ) -> None:  # fmt: skip
        self.stage, self.comm, self.spec, self.deferred = stage, comm, spec, weights
        self.last = micro_batches - 1
        self.loss_total = torch.zeros((), dtype=torch.float32)

    def forward(self, i: int, micro: MicroBatch, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input, output); the output is the loss on the last stage."""
        spec = self.spec
        if x is None:
            x = micro.input_ids
        else:
            x = x.to(spec.carry_dtype)  # (micro, seq, hidden)
            x.requires_grad_(spec.train)
        autocast = torch.autocast(x.device.type, dtype=spec.compute_dtype, enabled=spec.compute_dtype is not None)
        with self.comm.tracer.span("forward compute", f"F{i}"), torch.set_grad_enabled(spec.train), autocast:
            y = self.stage(x)
            if micro.labels is not None:
                y = spec.loss_fn(y, micro.labels)
                self.loss_total = self.loss_total.to(y.device) + y.detach().float()
        return x, y

    def backward(self, i: int, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Returns the gradient of the stage input as it travels (None on the first stage)."""
        deferring = self.deferred.deferring() if self.deferred is not None else nullcontext()
        if self.spec.watch is not None and i == self.last:
            self.spec.watch.arm(self.deferred.params if self.deferred is not None else ())
        with self.comm.tracer.span("backward compute", f"B{i}"), deferring:
            torch.autograd.backward(y, grad_tensors=grad.to(y.dtype) if grad is not None else None)
        return self.sendable(x.grad) if x.requires_grad else None

    def weights(self, i: int) -> None:
        """W of micro-batch i (the oldest whose W has not run): its linear layers' weight gradients."""
        if self.deferred is not None:
            watch = self.spec.watch if i == self.last else None
            with self.comm.tracer.span("backward compute", f"W{i}"):
                self.deferred.run_oldest(watch.accumulated if watch is not None else None)

    def sendable(self, y: torch.Tensor) -> torch.Tensor:
        return y.detach().to(self.spec.activation_dtype)


def gpipe_step(
    stage: nn.Module, comm: Communicator, micro_batches: Sequence[MicroBatch], spec: StepSpec
) -> torch.Tensor:
    """All forwards, then all backwards; gradients accumulate in ``stage``. Returns the sum of
    the micro-batch losses on the last stage (as ``spec.loss_fn`` scales them), 0 elsewhere.
    Each receive is posted one micro-batch ahead, so its data moves while this one computes."""
    m = len(micro_batches)
    run, shape, dtype = _Runner(stage, comm, spec, m), spec.activation_shape, spec.activation_dtype
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    incoming = comm.post_recv_forward(shape, dtype)
    for i, micro in enumerate(micro_batches):
        x_in = incoming.wait()
        if i + 1 < m:
            incoming = comm.post_recv_forward(shape, dtype)
        x, y = run.forward(i, micro, x_in)
        comm.send_forward(run.sendable(y), wait=False)  # travels while the next micro-batch computes
        if spec.train:
            held.append((x, y))
    if held:
        incoming = comm.post_recv_backward(shape, dtype)
    for i, (x, y) in enumerate(held):
        grad = incoming.wait()
        if i + 1 < m:
            incoming = comm.post_recv_backward(shape, dtype)
        comm.send_backward(run.backward(i, x, y, grad), wait=False)
    comm.flush()
    return run.loss_total


def one_f_one_b_step(
    stage: nn.Module, comm: Communicator, micro_batches: Sequence[MicroBatch], spec: StepSpec
) -> torch.Tensor:
    """1F1B: the same gradients as GPipe with activations held for at most p - s micro-batches."""
    return _one_forward_one_backward(stage, comm, micro_batches, spec, weights=None)


def zero_bubble_step(
    stage: nn.Module, comm: Communicator, micro_batches: Sequence[MicroBatch], spec: StepSpec
) -> torch.Tensor:
    """ZB-H1: 1F1B's order and memory, each backward split into B (input gradient, sent at
    once) and W (weight gradients, ``pipeline.weight_grad``); stage s runs each W s backwards
    late, so the later stages return gradients sooner and their W fill the cool-down."""
    return _one_forward_one_backward(stage, comm, micro_batches, spec, weights=deferred_weight_grads(stage))


def _one_forward_one_backward(
    stage: nn.Module,
    comm: Communicator,
    micro_batches: Sequence[MicroBatch],
    spec: StepSpec,
    weights: DeferredWeightGrads | None,
) -> torch.Tensor:
    """1F1B, and with ``weights`` zero-bubble's split backward. Warm-up and cool-down sends stay
    in flight while the next micro-batch computes. In the steady state a stage sends and
    receives in both directions with each neighbour; each such pair is posted as one batch
    (``send_*_recv_*``), which NCCL needs to avoid a deadlock; W runs while the second travels."""
    if not spec.train:
        return gpipe_step(stage, comm, micro_batches, spec)  # forwards only: nothing to interleave
    topo, m = comm.topo, len(micro_batches)
    run, shape, dtype = _Runner(stage, comm, spec, m, weights), spec.activation_shape, spec.activation_dtype
    warmup = min(topo.pipeline_size - topo.stage - 1, m)
    lag = topo.stage if weights is not None else 0  # backwards whose W waits
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    # warm-up: forwards only, filling the pipeline
    for i in range(warmup):
        x, y = run.forward(i, micro_batches[i], comm.recv_forward(shape, dtype))
        comm.send_forward(run.sendable(y), wait=False)  # travels while the next forward computes
        held.append((x, y))
    # steady state: one forward, one backward; sends and receives paired with each neighbour
    x_next = comm.recv_forward(shape, dtype) if warmup < m else None
    for k, i in enumerate(range(warmup, m)):
        x, y = run.forward(i, micro_batches[i], x_next)
        held.append((x, y))
        grad = comm.send_forward_recv_backward(run.sendable(y), shape, dtype)
        x_old, y_old = held.pop(0)
        grad_in = run.backward(k, x_old, y_old, grad)
        if i == m - 1:
            comm.send_backward(grad_in, wait=False)
            incoming = None
        else:
            incoming = comm.post_send_backward_recv_forward(grad_in, shape, dtype)
        if k >= lag:
            run.weights(k - lag)
        x_next = incoming.wait() if incoming is not None else None
    # cool-down: the backwards left, then the weight gradients still waiting
    for k in range(m - warmup, m):
        x_old, y_old = held.pop(0)
        grad_in = run.backward(k, x_old, y_old, comm.recv_backward(shape, dtype))
        comm.send_backward(grad_in, wait=False)
        if k >= lag:
            run.weights(k - lag)
    for k in range(max(0, m - lag), m):
        run.weights(k)
    comm.flush()
    return run.loss_total


SCHEDULES = {"gpipe": gpipe_step, "1f1b": one_f_one_b_step, "zb1": zero_bubble_step}
