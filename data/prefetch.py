"""The next steps' batches, drawn on a background thread while the pipeline computes."""

from __future__ import annotations

import copy
import queue
import threading

from data.stream import Batch, TokenStream


class Prefetcher:
    """Draws the next steps' batches on a background thread while the pipeline computes.

    Each batch comes with the stream's state right after it, so a checkpoint records the
    position of what was trained on, not of what was merely prefetched. (Tokenizers release
    the GIL, so the thread really overlaps with the step.)
    """

    def __init__(self, stream: TokenStream, per_step: int, depth: int = 2, pin_memory: bool = False) -> None:
        self._stream = stream
        self._per_step = per_step
        self._pin = pin_memory  # for a CUDA device: page-locked batches copy to it asynchronously
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="data-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._stream.next_batch(self._per_step)
                if self._pin and isinstance(batch, Batch):  # (a prompt stream's draw is a list: no tensors yet)
                    pinned = [t.pin_memory() for t in (batch.input_ids, batch.labels, batch.positions())]
                    batch = Batch(pinned[0], pinned[1], batch.tasks, pinned[2])
                item = (batch, copy.deepcopy(self._stream.state_dict()))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as err:  # noqa: BLE001 - handed to the training thread, which raises it
            self._queue.put(err)

    def next(self) -> tuple[Batch, dict]:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
