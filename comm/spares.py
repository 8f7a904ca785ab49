"""The spares of a run (--spares): which of them wait, admitted with the run's settings and token,
and which are alive. A waiting spare counts up ``spares/beat/<launch rank>`` as it polls
(comm.membership.wait_as_spare); a regroup gives a lost rank's slot only to a spare whose count
moved while the survivors agree, and refuses one whose count stood still (it died while it
waited). The agreement itself is comm.membership's."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist

from comm.admission import refusal
from comm.health import SILENT_S, Beats

SPARES = "spares/"  # spares/ask/<r>: a waiting spare; taken/<r>: the generation it joins; refused/<r>; beat/<r>


@dataclass(frozen=True)
class SparePool:
    """The --spares of a run: launch ranks ``first`` .. ``first + count - 1``, each admitted with
    the run's settings (and a proof of its token) before it may take a lost rank's place."""

    first: int
    count: int
    fingerprint: str
    token: str | None = field(default=None, repr=False)

    @property
    def ranks(self) -> range:
        return range(self.first, self.first + self.count)

    def ready(self, store: dist.Store) -> list[int]:
        """The spares waiting and admitted, in launch order; a spare asking with other settings
        or a wrong proof is refused (it reads why and stops)."""
        ready = []
        for rank in self.ranks:
            asked = f"{SPARES}ask/{rank}"
            done = (f"{SPARES}taken/{rank}", f"{SPARES}refused/{rank}")  # (check() of several keys: all of them)
            if not store.check([asked]) or any(store.check([key]) for key in done):
                continue
            refused = refusal(store, store.get(asked).decode(), rank, self.fingerprint, self.token)
            if refused is None:
                ready.append(rank)
            else:
                store.set(f"{SPARES}refused/{rank}", refused)
        return ready


def spare_beats(store: dist.Store, spares: SparePool) -> Beats:
    """The counts waiting spares move as they poll (comm.membership.wait_as_spare)."""
    return Beats(store, {r: f"{SPARES}beat/{r}" for r in spares.ranks})


def beating_spares(store: dist.Store, spares: SparePool, beats: Beats, silent: set[int],
                   silent_s: float) -> tuple[list[int], bool]:  # fmt: skip
    """The admitted spares seen beating, in launch order, and whether some admitted spare is not
    known yet either way. One that stood still (``silent``) is refused: it died while it waited,
    or froze (woken, it reads why and stops)."""
    ready = spares.ready(store)
    for rank in silent.intersection(ready):
        store.set(f"{SPARES}refused/{rank}", f"it stood still for {silent_s:g}s while it waited (dead or frozen)")
    free = [rank for rank in ready if rank in beats.moved]
    return free, any(rank not in beats.moved and rank not in silent for rank in ready)


def enough_spares(store: dist.Store, spares: SparePool, wanted: int, silent_s: float = SILENT_S,
                  poll_s: float = 0.05) -> bool:  # fmt: skip
    """Whether ``wanted`` spares wait, admitted and seen beating: watched until as many have
    beaten, until none is left unknown, or for ``silent_s``."""
    beats, deadline = spare_beats(store, spares), time.monotonic() + silent_s
    while True:
        free, unsure = beating_spares(store, spares, beats, beats.silent(silent_s), silent_s)
        if len(free) >= wanted or not unsure or time.monotonic() > deadline:
            return len(free) >= wanted
        time.sleep(poll_s)
