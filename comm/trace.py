"""Timed spans for tidy profiling: Chrome trace "complete" events, one lane per kind of work.

The tracer is handed to the communicator, so the schedule and the communication calls record
spans through one object; with profiling off it is ``NULL_TRACER``, whose span costs one
attribute lookup and an empty context manager.

On a GPU, kernels and NCCL transfers run after the Python call that queued them returns, so a
span there waits for the device at both ends: it times the work, not its launch (and
profiling slows a GPU run by those waits).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

# Lane (Chrome "thread") ids, in the order they appear in a viewer.
LANES = (
    "forward recv",
    "forward compute",
    "forward send",
    "backward recv",
    "backward compute",
    "backward send",
    "data-parallel comm",
    "optimizer step",
    "pipeline",
    "step",
)


class Tracer:
    """Collects spans of this rank in microseconds of its own monotonic clock."""

    def __init__(self, rank: int, device: torch.device | None = None) -> None:
        self.rank = rank
        self.events: list[dict] = []
        self.origin_ns = time.perf_counter_ns()
        self._device = device if device is not None and device.type == "cuda" else None

    def _settle(self) -> None:
        if self._device is not None:
            # this stream only: work.wait() has already ordered it after the transfers a span
            # covers, while a transfer posted ahead (NCCL's own streams) must not be waited for
            torch.cuda.current_stream(self._device).synchronize()

    def now_us(self) -> float:
        return (time.perf_counter_ns() - self.origin_ns) / 1000

    @contextmanager
    def span(self, lane: str, name: str | None = None, **args: object) -> Iterator[None]:
        self._settle()
        start = self.now_us()
        try:
            yield
            self._settle()  # not after an error: the device may be waiting on a lost peer
        finally:
            event = {"name": name or lane, "ph": "X", "ts": start, "dur": self.now_us() - start,
                     "pid": self.rank, "tid": LANES.index(lane)}  # fmt: skip
            if args:
                event["args"] = args
            self.events.append(event)


class NullTracer:
    """Profiling off: spans do nothing."""

    def span(self, lane: str, name: str | None = None, **args: object) -> nullcontext:
        return nullcontext()


NULL_TRACER = NullTracer()
