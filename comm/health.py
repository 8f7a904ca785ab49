"""Heartbeats through the job's rendezvous store: tell a dead or hung peer from a slow link.

Every rank bumps a counter in the store once a second and reads everyone else's. A peer whose
counter stops moving for ``dead_after`` seconds is dead or frozen (a slow link does not stop
it: the beats are a few bytes, sent from their own thread); a peer that stops with an error
leaves its reason. Either way this rank logs who was lost and exits, instead of waiting in a
collective until a long timeout (a run with spares only logs it, and beats on: its own calls
fail and it regroups). A rank that finishes normally marks itself done.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from comm.topology import Topology

log = logging.getLogger(__name__)


def leave_now(message: str) -> None:
    """Log and leave at once: the main thread may be blocked inside a collective."""
    log.error("%s", message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


class Heartbeat:
    def __init__(
        self,
        host: str,
        port: int,
        topo: Topology,
        dead_after_s: float,
        interval_s: float = 1.0,
        on_lost: Callable[[str], None] | None = None,
        key_prefix: str = "",
        watch: list[int] | None = None,
        pulse_key: str | None = None,
    ) -> None:
        self.topo = topo
        self.key_prefix = key_prefix
        # the ranks whose loss stops this one (default: all); an elastic run watches its own
        # pipeline only, and adds one to ``pulse_key`` a beat to show its store host it is alive
        self.watch = list(range(topo.world_size)) if watch is None else watch
        self.pulse_key = pulse_key
        self._store_owner = "the elastic run's store host" if pulse_key else topo.describe(0)
        self.dead_after_s = dead_after_s
        self.interval_s = interval_s
        self.on_lost = on_lost or (lambda problem: leave_now(f"{problem}; stopping"))  # told who was lost
        # Our own client: the default store belongs to the process group's thread.
        self._store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)
        self._beats = 0
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (last counter, when it last moved)
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _key(self, rank: int) -> str:
        return f"{self.key_prefix}heartbeat/{rank}"

    def _beat(self, exit_reason: str | None = None) -> None:
        self._beats += 1
        self._store.set(self._key(self.topo.rank), json.dumps({"beat": self._beats, "exit": exit_reason}))
        if self.pulse_key is not None:
            self._store.add(self.pulse_key, 1)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                problem = self._check()
            except RuntimeError as err:  # the store lives in rank 0's process
                if self._stop.is_set():
                    return
                problem = f"lost {self._store_owner}, which hosts the job's store ({str(err).splitlines()[0]})"
            if problem is not None and not self._stop.is_set():
                self.on_lost(f"{self.topo.describe(self.topo.rank)}: {problem}")
                break  # an ``on_lost`` that returns (a run with spares regroups): go on beating, stop checking
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except RuntimeError:
                return

    def peers(self) -> dict[int, dict]:
        """The watched ranks' last heartbeat records (none until every one has beaten)."""
        keys = [self._key(r) for r in self.watch]
        if not self._store.check(keys):
            return {}
        return {r: json.loads(v) for r, v in zip(self.watch, self._store.multi_get(keys), strict=True)}

    def _check(self) -> str | None:
        now = time.monotonic()
        for rank, record in self.peers().items():
            if rank == self.topo.rank:
                continue
            if record["exit"] and record["exit"] != "done":
                return f"{self.topo.describe(rank)} stopped: {record['exit']}"
            last, moved = self._seen.get(rank, (-1, now))
            if record["beat"] != last:
                self._seen[rank] = (record["beat"], now)
            elif record["exit"] is None and now - moved > self.dead_after_s:
                return f"lost {self.topo.describe(rank)}: no heartbeat for {now - moved:.0f}s (process dead or frozen)"
        return None

    def describe_lost(self) -> str:
        """Who has stopped, for the message of a failed collective (best effort)."""
        try:
            records = self.peers()
        except RuntimeError:
            return f"{self._store_owner}, which hosts the job's store, is gone"
        now = time.monotonic()
        notes = []
        for rank, record in records.items():
            if rank == self.topo.rank:
                continue
            if record["exit"] and record["exit"] != "done":
                notes.append(f"{self.topo.describe(rank)} stopped: {record['exit']}")
            elif rank in self._seen and now - self._seen[rank][1] > 2.5 * self.interval_s:
                notes.append(f"{self.topo.describe(rank)} has not beaten for {now - self._seen[rank][1]:.0f}s")
        return "; ".join(notes)

    def stop(self, exit_reason: str) -> None:
        """Stop beating and leave ``exit_reason`` ("done" or the error) for the others."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._beat(exit_reason)
        except RuntimeError:
            pass  # the store is gone with rank 0: nobody is left to tell


SILENT_S = 3.0  # a rank whose beat stood still this long while the survivors agree is lost


class Beats:
    """When each of some ranks last moved its beat in the store (``keys``: launch rank -> key),
    as this rank sees it from its first look on."""

    def __init__(self, store: dist.Store, keys: dict[int, str]) -> None:
        self.store, self.keys = store, keys
        self.seen: dict[int, tuple[bytes | None, float]] = {}
        self.moved: set[int] = set()  # beat since the first look: alive

    def silent(self, after_s: float) -> set[int]:
        """Look again; the ranks whose beat has stood still for more than ``after_s``."""
        now, silent = time.monotonic(), set()
        for launch_rank, key in self.keys.items():
            beat = self.store.get(key) if self.store.check([key]) else None
            last, since = self.seen.get(launch_rank, (None, now))
            if launch_rank not in self.seen:
                self.seen[launch_rank] = (beat, now)
            elif beat != last:
                self.seen[launch_rank] = (beat, now)
                self.moved.add(launch_rank)
            elif now - since > after_s:
                silent.add(launch_rank)
        return silent
