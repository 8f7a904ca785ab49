"""A thread of one rank's own for data-parallel collectives, so they travel while the main
thread computes (the gradient buckets that leave during the last backward, data_parallel.buckets).

Collectives of a group must be issued in the same order on every member, so the lane runs its
jobs one at a time, in the order they were handed in. Once a job fails, every later job fails
with the same error without running: a collective issued after a failed one would pair with the
wrong call on the other replicas.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch


class Pending:
    """A job handed to the lane; ``wait()`` returns its result or raises its error."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def wait(self) -> object:
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Lane:
    """Runs jobs in order on a daemon thread (a job stuck on a lost peer must not hold up exit)."""

    def __init__(self, name: str, device: torch.device | None = None) -> None:
        """``device``: a CUDA device to make the thread's current one (a new thread starts on GPU 0)."""
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Pending] | None] = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self._device = device if device is not None and device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> Pending:
        pending = Pending()
        self._jobs.put((job, pending))
        return pending

    def close(self) -> None:
        """The thread ends once the jobs already handed in are done."""
        self._jobs.put(None)

    def _run(self) -> None:
        if self._device is not None:
            torch.cuda.set_device(self._device)
        while (item := self._jobs.get()) is not None:
            job, pending = item
            if self._failed is None:
                try:
                    pending.result = job()
                except Exception as err:  # noqa: BLE001 - not swallowed: wait() raises it in the waiting thread
                    self._failed = err
            pending.error = self._failed
            pending._done.set()
