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
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from comm.p2p import Expected, Message, Neighbours
from modules.routing import LoadBalance
from pipeline.weight_grad import DeferredWeightGrads, deferred_weight_grads


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor | None  # (micro, seq) on the first stage, else None
    # on the last stage, what the objective's loss compares the output with (its labels, a
    # reference's log-probs, where a sequence is scored: objectives/), else None; the schedule
    # only hands it to the loss
    targets: dict[str, torch.Tensor] | None
    position_ids: torch.Tensor | None = None  # (micro, seq) on the first stage (None: 0..seq-1)


# the last stage's output and its micro-batch's targets -> the micro-batch's loss
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class GradientWatch(Protocol):
    """Hears when a step's gradients become final, to send each to the other replicas while the
    rest of the backward runs (data_parallel.buckets). Given to the step's last pipeline pass."""

    def arm(self, deferred: Collection[torch.Tensor]) -> None:
        """The last backward (B) begins: every gradient autograd accumulates from now on is
        final, except those of ``deferred``, whose weight gradients W forms later."""

    def accumulated(self, params: tuple[torch.Tensor, ...]) -> None:
        """The last W has added these parameters' share: their gradients are final."""


@dataclass
class RouterLoss:
    """A mixture of experts' load-balancing loss over one step (modules.routing): each
    micro-batch's router sums travel beside its activations, and the last stage adds
    ``weight * aux`` to the micro-batch's loss; ``total`` sums the step's aux values there."""

    balance: LoadBalance
    weight: float  # the coefficient over the step's micro-batches (all replicas), times any loss scale
    total: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))


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
    router_loss: RouterLoss | None = None  # a mixture of experts' load balancing (train only)
    # the first stage's position ids travel with the activations (examples packed apart restart
    # them); otherwise every stage counts 0..seq-1
    positions: bool = False

    def expected(self, forward: bool) -> Expected:
        """What a stage receives: activations (forward) or their gradients, and what travels beside."""
        side = self.router_loss.balance.size if self.router_loss is not None else 0
        return Expected(self.activation_shape, self.activation_dtype, side, forward and self.positions)


@dataclass
class _Held:
    """One micro-batch between its forward and its backward on this stage."""

    inputs: tuple[torch.Tensor, ...]  # the received activations (and router sums): their gradients go back
    outputs: tuple[torch.Tensor, ...]  # the loss, or the activations (and router sums) sent on
    positions: torch.Tensor | None  # the tokens' position ids, sent on with the activations


class _Runner:
    """Forward and backward of one micro-batch on this stage; the losses it saw. With
    ``weights`` a backward is B only, and ``weights(i)`` is micro-batch i's W. Backwards run in
    micro-batch order in every schedule, so the last of ``micro_batches`` finishes the gradients."""

    def __init__(
        self, stage: nn.Module, comm: Neighbours, spec: StepSpec, micro_batches: int,
        weights: DeferredWeightGrads | None = None,
    ) -> None:  # fmt: skip
        self.stage, self.comm, self.spec, self.deferred = stage, comm, spec, weights
        self.last = micro_batches - 1
        self.loss_total = torch.zeros((), dtype=torch.float32)

    def forward(self, i: int, micro: MicroBatch, received: Message | None) -> _Held:
        """The outputs are the loss on the last stage."""
        spec, routing = self.spec, self.spec.router_loss
        if received is None:
            x, positions = micro.input_ids, micro.position_ids if spec.positions else None
            sums = routing.balance.start(x.device) if routing is not None else None
        else:
            x, positions = received.tensor.to(spec.carry_dtype), received.positions  # (micro, seq, hidden)
            x.requires_grad_(spec.train)
            sums = received.side
            if sums is not None:
                sums.requires_grad_(spec.train)  # its gradient reaches the earlier stages' routers
        autocast = torch.autocast(x.device.type, dtype=spec.compute_dtype, enabled=spec.compute_dtype is not None)
        with self.comm.tracer.span("forward compute", f"F{i}"), torch.set_grad_enabled(spec.train), autocast:
            if routing is None:  # a stage module takes the positions only where they travel
                outputs = (self.stage(x) if positions is None else self.stage(x, positions),)
            else:
                outputs = self.stage.routed(x, sums, positions)
            if micro.targets is not None:
                loss = spec.loss_fn(outputs[0], micro.targets)
                if routing is not None and spec.train:
                    aux = routing.balance.loss(outputs[1])
                    loss = loss + routing.weight * aux
                    routing.total = routing.total.to(aux.device) + aux.detach()
                self.loss_total = self.loss_total.to(loss.device) + loss.detach().float()
                outputs = (loss,)
        inputs = (x,) if received is None or sums is None else (x, sums)
        return _Held(inputs, outputs, positions)

    def backward(self, i: int, held: _Held, grad: Message | None) -> Message | None:
        """Returns the gradient of the stage input as it travels (None on the first stage)."""
        deferring = self.deferred.deferring() if self.deferred is not None else nullcontext()
        if self.spec.watch is not None and i == self.last:
            self.spec.watch.arm(self.deferred.params if self.deferred is not None else ())
        outputs, grads = held.outputs, None
        if grad is not None:
            grads = (grad.tensor.to(outputs[0].dtype),) + ((grad.side,) if grad.side is not None else ())
            # a first stage without routers sends sums that carry no graph: nothing to differentiate
            outputs, grads = zip(*((o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad), strict=True)
        with self.comm.tracer.span("backward compute", f"B{i}"), deferring:
            torch.autograd.backward(outputs, grad_tensors=grads)
        x = held.inputs[0]
        if not x.requires_grad:
            return None
        side = held.inputs[1].grad if len(held.inputs) > 1 else None
        return Message(x.grad.detach().to(self.spec.activation_dtype), side)

    def weights(self, i: int) -> None:
        """W of micro-batch i (the oldest whose W has not run): its linear layers' weight gradients."""
        if self.deferred is not None:
            watch = self.spec.watch if i == self.last else None
            with self.comm.tracer.span("backward compute", f"W{i}"):
                self.deferred.run_oldest(watch.accumulated if watch is not None else None)

    def sendable(self, held: _Held) -> Message:
        """The activations (and router sums) to send on; the last stage sends nothing."""
        y, *side = held.outputs
        return Message(y.detach().to(self.spec.activation_dtype), side[0].detach() if side else None, held.positions)


def gpipe_step(stage: nn.Module, comm: Neighbours, micro_batches: Sequence[MicroBatch], spec: StepSpec) -> torch.Tensor:
    """All forwards, then all backwards; gradients accumulate in ``stage``. Returns the sum of
    the micro-batch losses on the last stage (as ``spec.loss_fn`` scales them), 0 elsewhere.
    Each receive is posted one micro-batch ahead, so its data moves while this one computes."""
    m = len(micro_batches)
    run, forward, backward = _Runner(stage, comm, spec, m), spec.expected(True), spec.expected(False)
    held: list[_Held] = []
    incoming = comm.post_recv_forward(forward)
    for i, micro in enumerate(micro_batches):
        received = incoming.wait()
        if i + 1 < m:
            incoming = comm.post_recv_forward(forward)
        done = run.forward(i, micro, received)
        comm.send_forward(run.sendable(done), wait=False)  # travels while the next micro-batch computes
        if spec.train:
            held.append(done)
    if held:
        incoming = comm.post_recv_backward(backward)
    for i, done in enumerate(held):
        grad = incoming.wait()
        if i + 1 < m:
            incoming = comm.post_recv_backward(backward)
        comm.send_backward(run.backward(i, done, grad), wait=False)
    comm.flush()
    return run.loss_total


def one_f_one_b_step(
    stage: nn.Module, comm: Neighbours, micro_batches: Sequence[MicroBatch], spec: StepSpec
) -> torch.Tensor:
    """1F1B: the same gradients as GPipe with activations held for at most p - s micro-batches."""
    return _one_forward_one_backward(stage, comm, micro_batches, spec, weights=None)


def zero_bubble_step(
    stage: nn.Module, comm: Neighbours, micro_batches: Sequence[MicroBatch], spec: StepSpec
) -> torch.Tensor:
    """ZB-H1: 1F1B's order and memory, each backward split into B (input gradient, sent at
    once) and W (weight gradients, ``pipeline.weight_grad``); stage s runs each W s backwards
    late, so the later stages return gradients sooner and their W fill the cool-down."""
    return _one_forward_one_backward(stage, comm, micro_batches, spec, weights=deferred_weight_grads(stage))


def _one_forward_one_backward(
    stage: nn.Module,
    comm: Neighbours,
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
    run, forward, backward = _Runner(stage, comm, spec, m, weights), spec.expected(True), spec.expected(False)
    warmup = min(topo.pipeline_size - topo.stage - 1, m)
    lag = topo.stage if weights is not None else 0  # backwards whose W waits
    held: list[_Held] = []
    # warm-up: forwards only, filling the pipeline
    for i in range(warmup):
        done = run.forward(i, micro_batches[i], comm.recv_forward(forward))
        comm.send_forward(run.sendable(done), wait=False)  # travels while the next forward computes
        held.append(done)
    # steady state: one forward, one backward; sends and receives paired with each neighbour
    received = comm.recv_forward(forward) if warmup < m else None
    for k, i in enumerate(range(warmup, m)):
        done = run.forward(i, micro_batches[i], received)
        held.append(done)
        grad = comm.send_forward_recv_backward(run.sendable(done), backward)
        grad_in = run.backward(k, held.pop(0), grad)
        if i == m - 1:
            comm.send_backward(grad_in, wait=False)
            incoming = None
        else:
            incoming = comm.post_send_backward_recv_forward(grad_in, forward)
        if k >= lag:
            run.weights(k - lag)
        received = incoming.wait() if incoming is not None else None
    # cool-down: the backwards left, then the weight gradients still waiting
    for k in range(m - warmup, m):
        grad_in = run.backward(k, held.pop(0), comm.recv_backward(backward))
        comm.send_backward(grad_in, wait=False)
        if k >= lag:
            run.weights(k - lag)
    for k in range(max(0, m - lag), m):
        run.weights(k)
    comm.flush()
    return run.loss_total


SCHEDULES = {"gpipe": gpipe_step, "1f1b": one_f_one_b_step, "zb1": zero_bubble_step}
