"""Toy stages and stand-ins for a stage's neighbours, for schedule tests that run in one process."""

from __future__ import annotations

import torch
from torch import nn

from comm.p2p import Expected, Message
from comm.topology import Topology
from comm.trace import NULL_TRACER
from pipeline.schedule import MicroBatch, StepSpec

HIDDEN, SEQ = 8, 4


class Posted:
    def __init__(self, message: Message | None) -> None:
        self.message = message

    def wait(self) -> Message | None:
        return self.message


class LoopbackComm:
    """Stands in for one stage's neighbours: every receive yields a fresh tensor."""

    def __init__(self, stage: int, stages: int) -> None:
        self.topo = Topology(stage, stages, 1)
        self.tracer = NULL_TRACER

    def _fresh(self, expected: Expected, skip: bool) -> Message | None:
        if skip:
            return None
        side = torch.randn(expected.side) if expected.side else None
        positions = torch.arange(expected.shape[1]).expand(expected.shape[:-1]) if expected.positions else None
        return Message(torch.randn(expected.shape, dtype=expected.dtype), side, positions)

    def post_recv_forward(self, expected):
        return Posted(self._fresh(expected, self.topo.is_first_stage))

    def post_recv_backward(self, expected):
        return Posted(self._fresh(expected, self.topo.is_last_stage))

    def recv_forward(self, expected):
        return self.post_recv_forward(expected).wait()

    def recv_backward(self, expected):
        return self.post_recv_backward(expected).wait()

    def send_forward_recv_backward(self, message, expected):
        return self.recv_backward(expected)

    def send_backward_recv_forward(self, message, expected):
        return self.recv_forward(expected)

    def post_send_backward_recv_forward(self, message, expected):
        return Posted(self.send_backward_recv_forward(message, expected))

    def send_forward(self, message, wait=True) -> None:
        pass

    def send_backward(self, message, wait=True) -> None:
        pass

    def flush(self) -> None:
        pass


TOY_SPEC = StepSpec((1, SEQ, HIDDEN), torch.float32, lambda out, micro: out.float().pow(2).mean())


def toy_micro_batches(stage: int, stages: int, micro: int) -> list[MicroBatch]:
    """Token ids on the first stage, labels on the last, as the trainer hands them out."""
    first, last = stage == 0, stage == stages - 1
    return [MicroBatch(torch.randint(0, 16, (1, SEQ)) if first else None,
                       {"labels": torch.randint(0, 16, (1, SEQ))} if last else None) for _ in range(micro)]  # fmt: skip


class ToyBlocks(nn.Module):
    """Linear layers with and without bias, GPT-2's Conv1D, a norm and a residual: every kind of
    weight the split backward treats (deferred or not)."""

    def __init__(self, first: bool) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(5)
        self.embed = nn.Embedding(16, HIDDEN) if first else None
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.norm = nn.LayerNorm(2 * HIDDEN)
        self.conv = Conv1D(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        return h + self.down(torch.tanh(self.conv(self.norm(self.up(h)))))


class KeyedLoopbackComm(LoopbackComm):
    """The n-th activation and the n-th gradient a stage receives are the same in every
    schedule, whatever order it asks for them in."""

    def __init__(self, stage: int, stages: int) -> None:
        super().__init__(stage, stages)
        self.received = {"forward": 0, "backward": 0}

    def _keyed(self, way: str, expected: Expected, skip: bool) -> Posted:
        if skip:
            return Posted(None)
        n = self.received[way]
        self.received[way] += 1
        generator = torch.Generator().manual_seed(1000 * (way == "backward") + n)
        return Posted(Message(torch.randn(expected.shape, generator=generator).to(expected.dtype)))

    def post_recv_forward(self, expected):
        return self._keyed("forward", expected, self.topo.is_first_stage)

    def post_recv_backward(self, expected):
        return self._keyed("backward", expected, self.topo.is_last_stage)
