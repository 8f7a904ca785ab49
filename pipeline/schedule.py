"""GPipe: all micro-batch forwards, then all backwards, with one loop for every stage.

    stage 0:  F0 F1 F2 F3 . . . . . . . . B0 B1 B2 B3
    stage 1:     F0 F1 F2 F3 B0 B1 B2 B3

The communicator's helpers return ``None`` / do nothing at the pipeline ends, so the first
stage reads its input from the micro-batch, the last turns its output into the loss, and
nothing else differs between stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from comm.process_group import Communicator


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor | None  # (micro, seq) on the first stage, else None
    labels: torch.Tensor | None  # (micro, seq) on the last stage, else None


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gpipe_step(
    stage: nn.Module,
    comm: Communicator,
    micro_batches: Sequence[MicroBatch],
    activation_shape: tuple[int, ...],
    activation_dtype: torch.dtype,
    loss_fn: LossFn,
    train: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run forward and backward of every micro-batch; gradients accumulate in ``stage``.

    With ``train=False`` only the forwards run, without autograd (evaluation). Activations
    and their gradients travel as ``activation_dtype``; ``compute_dtype`` (fp16/bf16) runs
    the forward under autocast over fp32 weights. Returns the sum of the micro-batch losses
    on the last stage (as ``loss_fn`` scales them), 0 elsewhere.
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    loss_total = torch.zeros((), dtype=torch.float32)
    tracer = comm.tracer
    for i, micro in enumerate(micro_batches):
        # communication: activations from the previous stage (None on the first stage)
        x = comm.recv_forward(activation_shape, activation_dtype)
        if x is None:
            x = micro.input_ids
        elif train:
            x.requires_grad_(True)
        # forward
        autocast = torch.autocast(x.device.type, dtype=compute_dtype, enabled=compute_dtype is not None)
        with tracer.span("forward compute", f"F{i}"), torch.set_grad_enabled(train), autocast:
            y = stage(x)
            if micro.labels is not None:
                y = loss_fn(y, micro.labels)
                loss_total += y.detach().float()
        # send to the next stage (nothing on the last)
        comm.send_forward(y.detach().to(activation_dtype))
        if train:
            inputs.append(x)
            outputs.append(y)

    for i, (x, y) in enumerate(zip(inputs, outputs, strict=True)):
        # communication: gradient of our output from the next stage (None on the last stage)
        grad = comm.recv_backward(activation_shape, activation_dtype)
        # backward
        with tracer.span("backward compute", f"B{i}"):
            torch.autograd.backward(y, grad_tensors=grad.to(y.dtype) if grad is not None else None)
        # send the gradient of our input back (nothing on the first stage)
        comm.send_backward(x.grad if x.requires_grad else None)
    return loss_total
