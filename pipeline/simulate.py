"""A pipeline step simulated over free links, from the compute order our schedules really run.

``schedule_orders`` runs a schedule of ``pipeline.schedule`` on a one-weight stand-in with a
neighbour that has always already answered, and reads each stage's order of F, B and W off the
spans the schedule opens: the order is the schedule code's own, never a copy. ``simulate``
replays those orders with given op lengths, each op starting when its stage is free and its
input exists, and gives the step's length and each stage's idle share (the bubble). Used by
bench/bubble.py and bench/pipeline_vs_torch.py, tested in tests/test_simulate.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from comm.p2p import Expected, Message, Neighbours
from comm.topology import Topology
from comm.trace import LANES, Tracer
from pipeline.schedule import MicroBatch, StepSpec

ScheduleStep = Callable[[nn.Module, Neighbours, Sequence[MicroBatch], StepSpec], torch.Tensor]
Op = tuple[str, int]  # ("F" forward | "B" backward, input gradient only under zb1 | "W" weight gradients, micro-batch)
TRACED_LANES = {LANES.index("forward compute"), LANES.index("backward compute")}  # the spans F{i}, B{i}, W{i}


class _OrderOnlyComm:
    """Stands in for one stage's neighbours (``comm.p2p.Neighbours``) where only the compute order
    matters: every receive has arrived (zeros; None past the pipeline's ends, as the real helpers
    return), sends go nowhere, and the tracer keeps the compute spans the schedule opens."""

    def __init__(self, stage: int, stages: int) -> None:
        self.topo = Topology(stage, stages, 1)
        self.tracer = Tracer(stage)

    @staticmethod
    def _arrived(tensor: torch.Tensor | None) -> torch.futures.Future:
        """A posted receive whose tensor is already here: ``wait()`` returns it, as the real handle's does."""
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(tensor)
        return done

    def _zeros(self, expected: Expected, end: bool) -> torch.futures.Future:
        return self._arrived(None if end else Message(torch.zeros(expected.shape, dtype=expected.dtype)))

    def post_recv_forward(self, expected: Expected) -> torch.futures.Future:
        return self._zeros(expected, self.topo.is_first_stage)

    def post_recv_backward(self, expected: Expected) -> torch.futures.Future:
        return self._zeros(expected, self.topo.is_last_stage)

    def recv_forward(self, expected: Expected) -> Message | None:
        return self.post_recv_forward(expected).wait()

    def recv_backward(self, expected: Expected) -> Message | None:
        return self.post_recv_backward(expected).wait()

    def send_forward_recv_backward(self, _: object, expected: Expected) -> Message | None:
        return self.recv_backward(expected)

    def send_backward_recv_forward(self, _: object, expected: Expected) -> Message | None:
        return self.recv_forward(expected)

    def post_send_backward_recv_forward(self, _: object, expected: Expected) -> torch.futures.Future:
        return self.post_recv_forward(expected)

    def send_forward(self, _: object, wait: bool = True) -> None:
        pass

    def send_backward(self, _: object, wait: bool = True) -> None:
        pass

    def flush(self) -> None:
        pass


def schedule_orders(step: ScheduleStep, stages: int, micro_batches: int) -> list[list[Op]]:
    """Each stage's compute order under ``step`` (a function of pipeline.schedule), read off the
    spans it opens running on a one-weight stage: the orders are the schedule code's own, so they
    cannot drift from it as a copy typed out here could."""
    spec = StepSpec((1, 1), torch.float32, loss_fn=lambda y, micro: y.sum())
    orders = []
    for s in range(stages):
        comm = _OrderOnlyComm(s, stages)
        toy = torch.zeros(1, 1)  # input "ids" of the first stage, labels of the last
        micro = [MicroBatch(toy if s == 0 else None, {"labels": toy} if s == stages - 1 else None)] * micro_batches
        step(nn.Linear(1, 1), comm, micro, spec)  # the stand-in has every helper the schedules call
        orders.append([(e["name"][0], int(e["name"][1:])) for e in comm.tracer.events if e["tid"] in TRACED_LANES])
    return orders


@dataclass(frozen=True)
class Simulated:
    """A step run over free links: per stage, when its last op ended and how long it computed."""

    ends: tuple[float, ...]
    busy: tuple[float, ...]

    @property
    def step(self) -> float:
        return max(self.ends)

    @property
    def idle_share(self) -> float:
        """As observability.profiling.summarize's bubble: per stage, 1 - compute / its span (from the
        step's start to its own last op), averaged over stages."""
        return statistics.fmean(1 - busy / end for busy, end in zip(self.busy, self.ends, strict=True))


def simulate(orders: list[list[Op]], seconds: Callable[[str, int, int], float]) -> Simulated:
    """Every stage runs its order from t=0, each op as soon as the one before it ended and its
    input exists: a forward of micro-batch i needs stage s-1's forward of i, a backward (B) needs
    stage s+1's; W waits for nothing but its own stage. ``seconds(kind, s, i)`` is how long op
    (kind, i) takes on stage s; links cost nothing."""
    left = [list(order) for order in orders]  # what each stage has still to run
    clock = [0.0] * len(orders)  # when each stage's latest op ended
    busy = [0.0] * len(orders)
    ended: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> when it ended
    while any(left):
        progressed = False
        for s, order in enumerate(left):  # run each stage as far as its inputs allow
            while order:
                kind, i = order[0]
                source = {"F": s - 1, "B": s + 1}.get(kind)  # the neighbour whose output this op needs
                needs = source is not None and 0 <= source < len(orders)
                if needs and (kind, source, i) not in ended:
                    break
                order.pop(0)
                took = seconds(kind, s, i)
                clock[s] = max(clock[s], ended[kind, source, i] if needs else 0.0) + took
                busy[s] += took
                ended[kind, s, i] = clock[s]
                progressed = True
        if not progressed:
            raise ValueError(f"the stages' orders wait on each other for ever: {left}")
    return Simulated(tuple(clock), tuple(busy))


def closed_form_idle(stages: int, micro_batches: int, forward: float, backward: float, weight: float = 0.0) -> float:
    """The textbook idle share for F, B, W of the given lengths on equal stages: GPipe and 1F1B
    (p-1)/(m+p-1) (``weight`` 0, the backward whole); ZB-H1 (p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W)),
    about (p-1)/(3m+p-1) when F, B and W are equal (Qi et al. 2024)."""
    bubble = (stages - 1) * (forward + backward - weight)
    return bubble / (micro_batches * (forward + backward + weight) + bubble)
