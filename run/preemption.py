"""Preemption notices: a rented machine is told before it is taken away; the run uses that time.

SIGTERM (a spot instance's notice, Kubernetes' grace period, SLURM at the end of a job, a
person's ``kill``) and SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``) do not kill the rank: they
mark a notice, which the trainer shares with every rank at the end of the step (trainer.loop:
a few bytes riding on each step's own sums), so the whole run stops at the same step boundary,
commits a checkpoint of that step and exits 0.

The notice is bounded: if the run has not stopped ``grace_s`` seconds after it (a peer stuck,
a step far longer than the notice), or a second signal arrives, the process ends at once with
the status a shell gives a process that signal killed (128 + its number), as it would have
without this handler. A checkpoint being written then is never half-taken: ``latest`` moves
only once every stage has committed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

log = logging.getLogger(__name__)

NOTICES = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionNotice:
    """Holds whether (and when) this process was told to stop; ``install`` takes over SIGTERM and
    SIGUSR1 for the run (main thread only), ``uninstall`` gives them back."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received_at: float | None = None  # time.monotonic() of the first notice
        self.signal_name = ""
        self._previous: dict[int, object] = {}
        self._deadline: threading.Timer | None = None

    @property
    def pending(self) -> bool:
        return self.received_at is not None

    def seconds_since(self) -> float:
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0

    def install(self) -> None:
        for signum in NOTICES:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received_at is not None:
            self._give_up(signum, f"a second notice ({name}) arrived before the run could stop")
            return
        self.received_at, self.signal_name = time.monotonic(), name
        log.warning(
            "received %s: the run stops at the end of this step with a checkpoint of it (within --preempt-grace "
            "%gs; a second signal stops at once)", name, self.grace_s,
        )  # fmt: skip
        self._deadline = threading.Timer(
            self.grace_s, self._give_up, (signum, f"the run did not stop within --preempt-grace {self.grace_s:g}s")
        )
        self._deadline.daemon = True
        self._deadline.start()

    def _give_up(self, signum: int, why: str) -> None:
        """The notice ran out: end now. ``os._exit`` works from the timer's thread too, while the
        main thread may be blocked in a collective that a stuck peer never completes."""
        log.error("%s: stopping now; the last committed checkpoint is intact", why)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(128 + signum)
