"""Which ranks train in a run that regroups (``--elastic``, ``--spares``), agreed through the
job's store.

A generation is one membership: the launch replicas (``--rank // pp``) whose pipelines are
complete, renumbered in launch order, so ranks keep the layout of ``topology.py``; and, with
spares, which spare holds each slot (a launch rank's place) whose launched rank was lost.
Generation 0 is the launch; later ones take numbers from a counter in the store, and the process
groups of generation g use the key space ``gen<g>/pg/``, so a generation never reads another's
addresses. Rank 0 of each generation publishes it under ``CURRENT`` once it trains.

When a rank is lost:

- every rank of its pipeline sees a point-to-point or pipeline collective fail (or its heartbeat
  stop). Without spares it marks itself ``lost`` and exits: its closed connections release
  whoever waits on it. With spares it tears down its process groups (the same release) and
  registers ``alive`` for the next generation;
- the other pipelines see a data-parallel collective fail. They finish the step's pipeline
  all-reduce with a flag instead of stepping (no replica commits a step another did not), and
  each of their ranks registers ``alive`` for the next generation;
- a rank is lost when it marked itself so or its heartbeat stood still for ``SILENT_S`` (a
  SIGKILLed rank marks nothing); a replica whose rank left on purpose (``left``: a preemption
  notice) is never mended (with a free spare for it, a noticed rank marks itself ``lost``
  instead, once its step is committed, and is replaced);
- the first rank to see every launch replica decided (all its ranks alive; or, without spares,
  one of them gone; or, with spares, each of them alive or lost), or to wait out the settle time,
  fixes the next generation with one compare-and-set: the complete pipelines and those whose
  every lost slot a free spare fills. All read it, and write each chosen spare its generation
  under ``spares/taken/<launch rank>``, where it waits (``wait_as_spare``). Only a spare seen
  beating while the survivors agree is free; one that stood still for ``SILENT_S`` (it died while
  it waited) is refused, so no slot goes to a dead process (comm.spares);
- before tearing down the old groups, the survivors the new generation holds wait for each other
  in the store (``all_done``), so none closes a connection a slower one still reads from. Planned
  changes (a join, a preemption notice) wait so too, for every rank of the generation.

When ranks are started again with the same flags while a run is live, they join:

- each asks under the live generation (``join/<launch rank>``, with its settings' fingerprint);
- rank 0 of the generation, at the end of a step k, sees a whole launch replica asking and
  announces the next generation for the end of step k + 1 (one compare-and-set, so once). Every
  rank reads the announcement at the end of each step: a rank can only finish step k + 1 after
  rank 0 began it (every step all-reduces across the replicas and then along each pipeline), so
  all of them see it at that same step;
- the joiners, waiting on the announcement, make the new generation's groups with them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from comm.admission import ask_with_proof, refusal
from comm.health import SILENT_S, Beats
from comm.spares import SPARES, SparePool, beating_spares, spare_beats
from comm.store_host import CURRENT, FINISHED, PULSE
from comm.topology import Topology

GENERATIONS = "elastic/generations"  # counter: the next generation's number


@dataclass(frozen=True)
class Membership:
    generation: int
    replicas: tuple[int, ...]  # the launch replica of each live pipeline, in the new replica order
    pipeline_size: int
    # --spares: (a slot's launch rank, the spare's launch rank that holds the slot now), for
    # each slot whose launched rank was lost; a slot's place stays its launched rank's
    stand_ins: tuple[tuple[int, int], ...] = ()

    @classmethod
    def at_launch(cls, topo: Topology) -> Membership:
        return cls(0, tuple(range(topo.data_size)), topo.pipeline_size)

    @classmethod
    def from_record(cls, record: dict, pipeline_size: int | None = None) -> Membership:
        return cls(record["generation"], tuple(record["replicas"]), pipeline_size or record["pipeline_size"],
                   tuple((slot, spare) for slot, spare in record.get("stand_ins", ())))  # fmt: skip

    @property
    def key_space(self) -> str:
        return f"gen{self.generation}/"

    def occupant(self, slot: int) -> int:
        """The launch rank of the process that holds ``slot`` (a launch rank's place)."""
        return dict(self.stand_ins).get(slot, slot)

    def slot_of(self, launch_rank: int) -> int | None:
        """The slot the process launched as ``launch_rank`` holds (None: a spare took it over)."""
        for slot, spare in self.stand_ins:
            if spare == launch_rank:
                return slot
        return None if launch_rank in dict(self.stand_ins) else launch_rank

    def topology(self, launch_rank: int) -> Topology:
        """Where the rank launched as ``launch_rank`` sits in this generation."""
        pp, slot = self.pipeline_size, self.slot_of(launch_rank)
        if slot is None:
            raise ValueError(f"launch rank {launch_rank} holds no place in generation {self.generation}")
        return Topology(self.replicas.index(slot // pp) * pp + slot % pp, pp, len(self.replicas))

    def launch_ranks(self) -> list[int]:
        pp = self.pipeline_size
        return [self.occupant(replica * pp + stage) for replica in self.replicas for stage in range(pp)]

    def holds(self, launch_rank: int) -> bool:
        slot = self.slot_of(launch_rank)
        return slot is not None and slot // self.pipeline_size in self.replicas

    def new_stand_ins(self, before: Membership) -> list[tuple[int, int]]:
        """The (slot, spare) pairs of this generation that ``before`` did not have."""
        return [pair for pair in self.stand_ins if pair not in before.stand_ins]


def _record(store: dist.Store, key: str) -> dict | None:
    return json.loads(store.get(key)) if store.check([key]) else None


def publish(store: dist.Store, membership: Membership, layers: list[list[int]]) -> None:
    """Rank 0 of a generation that trains: where joiners find it (and each stage's layers)."""
    record = {"generation": membership.generation, "replicas": list(membership.replicas),
              "pipeline_size": membership.pipeline_size, "stand_ins": membership.stand_ins,
              "layers": layers}  # fmt: skip
    store.set(CURRENT, json.dumps(record))


def live_run(store: dist.Store, watch_s: float = 3.0) -> dict | None:
    """The published generation of a run that is training now (its heartbeats move the pulse
    within ``watch_s``), or None when the store holds no run. A run that stopped without ending
    cleanly leaves its store up for a while: that is an error, not a run to join."""
    record = _record(store, CURRENT)
    if store.check([FINISHED]):
        raise ConnectionError("the store at --dist-url belongs to an elastic run that has just finished; it closes "
                              "within seconds: launch again then")  # fmt: skip
    if record is None:
        return None
    first, deadline = store.add(PULSE, 0), time.monotonic() + watch_s
    while time.monotonic() < deadline:
        if store.add(PULSE, 0) != first:
            return record
        time.sleep(0.1)
    raise ConnectionError(
        "the store at --dist-url belongs to an elastic run that stopped (no heartbeat for "
        f"{watch_s:g}s); it closes by itself about a minute after its last rank, then launch again"
    )


def mark_left(store: dist.Store, membership: Membership, launch_rank: int, reason: str) -> None:
    """Tell the survivors' agreement that this rank's replica leaves on purpose (a preemption
    notice): no spare takes its place."""
    store.set(f"{membership.key_space}left/{launch_rank}", reason)


def mark_lost(store: dist.Store, membership: Membership, launch_rank: int, reason: str) -> None:
    """Tell the survivors' agreement that this rank is gone (an error, or its pipeline broke
    in a run without spares; it is about to exit): a spare may take its place."""
    store.set(f"{membership.key_space}lost/{launch_rank}", reason)


def all_done(store: dist.Store, current: Membership, tag: str, timeout_s: float, ranks: int | None = None,
             poll_s: float = 0.01) -> None:  # fmt: skip
    """Every rank of ``current`` (or the ``ranks`` of them that survive a loss) calls this before
    a change of generation (``tag`` names it): it returns once all of them have, so each has
    finished its last collective in this generation. A rank that tore down its groups or exited
    at once could close a connection a slower peer still reads that collective's last bytes
    from, failing the peer's call."""
    key, count = f"{current.key_space}done/{tag}", len(current.launch_ranks()) if ranks is None else ranks
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < count:
        if time.monotonic() > deadline:
            raise ConnectionError(f"generation {current.generation}: not every rank reached {tag} within "
                                  f"{timeout_s:.0f}s (--comm-timeout); a rank is lost or stuck")  # fmt: skip
        time.sleep(poll_s)


def _member_beats(store: dist.Store, current: Membership) -> Beats:
    """The heartbeats (comm.health) of ``current``'s ranks."""
    space = current.key_space
    return Beats(store, {r: f"{space}heartbeat/{current.topology(r).rank}" for r in current.launch_ranks()})


def next_membership(
    store: dist.Store, current: Membership, launch_rank: int, settle_s: float, spares: SparePool | None = None,
    poll_s: float = 0.05, silent_s: float = SILENT_S,
) -> Membership:  # fmt: skip
    """Register this (surviving) rank for the generation after ``current`` and return that
    generation's membership, the same on every rank that calls this (module docstring). With
    ``spares``, the ranks of a broken pipeline survive too, and a spare takes each lost rank's
    slot; a pipeline is dropped when one of its ranks left on purpose or spares are too few."""
    space, pp = current.key_space, current.pipeline_size
    store.set(f"{space}alive/{launch_rank}", "1")
    deadline, beats = time.monotonic() + settle_s, _member_beats(store, current)
    waiting = spare_beats(store, spares) if spares is not None else None
    while not store.check([f"{space}next"]):
        ranks = current.launch_ranks()
        alive = {r for r in ranks if store.check([f"{space}alive/{r}"])}
        left = {r for r in ranks if store.check([f"{space}left/{r}"])}
        lost = {r for r in ranks if store.check([f"{space}lost/{r}"])} | beats.silent(silent_s)
        late = time.monotonic() > deadline
        complete, holes, undecided = [], {}, False
        for replica in current.replicas:
            slots = {replica * pp + s: current.occupant(replica * pp + s) for s in range(pp)}
            if all(r in alive for r in slots.values()):
                complete.append(replica)
            elif any(r in left for r in slots.values()) or (spares is None and any(r in lost for r in slots.values())):
                continue  # broken: it leaves
            elif spares is not None and (late or all(r in alive or r in lost for r in slots.values())):
                holes[replica] = [slot for slot, r in slots.items() if r not in alive]
            else:
                undecided = True
        still = waiting.silent(silent_s) if spares is not None else set()  # watched from the first look on
        if not undecided or late:
            free, unsure = beating_spares(store, spares, waiting, still, silent_s) if holes else ([], False)
            if not unsure or late:  # (a live spare's beat moves within its poll)
                _propose(store, current, complete, holes, free)
                break
        time.sleep(poll_s)
    chosen = json.loads(store.get(f"{space}next"))
    membership = Membership.from_record(chosen, pp)
    for _, spare in membership.new_stand_ins(current):  # every rank writes the same: whoever is first
        store.set(f"{SPARES}taken/{spare}", json.dumps({**chosen, "pipeline_size": pp, "before": current.stand_ins}))
    return membership


def _propose(
    store: dist.Store, current: Membership, complete: list[int], holes: dict[int, list[int]], free: list[int]
) -> None:
    """Propose the next generation (the first proposal wins): the complete pipelines, and those
    with lost ranks whose every hole a free spare fills, in launch order."""
    pp, kept, stand_ins = current.pipeline_size, list(complete), {}
    free = [spare for spare in free if spare not in {s for _, s in current.stand_ins}]  # a spare serves once
    for replica, slots in sorted(holes.items()):
        if len(slots) <= len(free):
            kept.append(replica)
            stand_ins.update({slot: free.pop(0) for slot in slots})
    for slot, spare in current.stand_ins:
        if slot // pp in kept and slot not in stand_ins:
            stand_ins[slot] = spare
    proposal = {"generation": store.add(GENERATIONS, 1), "replicas": [r for r in current.replicas if r in kept],
                "stand_ins": sorted(stand_ins.items())}  # fmt: skip
    store.compare_set(f"{current.key_space}next", "", json.dumps(proposal))


def ask_to_join(store: dist.Store, generation: int, launch_rank: int, fingerprint: str, token: str | None) -> None:
    """A relaunched rank asks the live generation ``generation`` to take its replica back."""
    ask_with_proof(store, f"gen{generation}/join/{launch_rank}", launch_rank, fingerprint, token)


def joining_replicas(
    store: dist.Store, current: Membership, launched: int, fingerprint: str, token: str | None
) -> list[int]:
    """Launch replicas (of ``launched``) outside ``current`` whose every rank asks to join with
    these settings (and a valid proof of the run token, when it has one); a rank asking with
    other settings or a wrong proof is refused (rank 0 of the generation asks)."""
    pp, space, ready = current.pipeline_size, current.key_space, []
    for replica in range(launched):
        if replica in current.replicas:
            continue
        asking = 0
        for rank in range(replica * pp, (replica + 1) * pp):
            if not store.check([f"{space}join/{rank}"]):
                continue
            refused = refusal(store, store.get(f"{space}join/{rank}").decode(), rank, fingerprint, token)
            if refused is None:
                asking += 1
            else:
                store.set(f"{space}refused/{rank}", refused)
        if asking == pp:
            ready.append(replica)
    return ready


def announce_growth(store: dist.Store, current: Membership, joining: list[int], step: int) -> None:
    """Rank 0: the generation with ``joining`` added starts after step ``step`` (once only)."""
    record = {"step": step, "generation": store.add(GENERATIONS, 1),
              "replicas": sorted([*current.replicas, *joining]), "stand_ins": current.stand_ins}  # fmt: skip
    store.compare_set(f"{current.key_space}grow", "", json.dumps(record))


def growth_after(store: dist.Store, current: Membership, step: int) -> Membership | None:
    """The generation announced to start after step ``step``, if any (every rank, every step)."""
    record = _record(store, f"{current.key_space}grow")
    if record is None or record["step"] != step:
        return None
    return Membership.from_record(record, current.pipeline_size)


def wait_to_join(
    store: dist.Store, launch_rank: int, fingerprint: str, token: str | None, timeout_s: float, poll_s: float = 0.1
) -> tuple[Membership, dict]:
    """A relaunched rank: ask the live run to take this rank's replica back, and return the
    generation that does (with the live run's published record). Asks again under each new
    generation, so a regroup meanwhile only delays it."""
    deadline = time.monotonic() + timeout_s
    asked = None
    while time.monotonic() < deadline:
        if store.check([FINISHED]):
            raise ConnectionError("the elastic run finished before this replica could join it")
        record = json.loads(store.get(CURRENT))
        current = Membership.from_record(record)
        if asked != current.generation:
            ask_to_join(store, current.generation, launch_rank, fingerprint, token)
            asked = current.generation
        if store.check([f"{current.key_space}refused/{launch_rank}"]):
            reason = store.get(f"{current.key_space}refused/{launch_rank}").decode()
            raise ValueError(f"the live elastic run refused rank {launch_rank}: {reason}")
        grown = _record(store, f"{current.key_space}grow")
        if grown is not None and launch_rank // current.pipeline_size in grown["replicas"]:
            return Membership.from_record(grown, current.pipeline_size), record
        time.sleep(poll_s)
    raise ConnectionError(f"rank {launch_rank} asked for {timeout_s:g}s to join the live elastic run, and was not "
                          "taken in: are all ranks of its replica started?")  # fmt: skip


def wait_as_spare(store: dist.Store, launch_rank: int, fingerprint: str, token: str | None,
                  leave: Callable[[], bool] = lambda: False,
                  poll_s: float = 0.2) -> tuple[Membership, list[tuple[int, int]], dict] | None:  # fmt: skip
    """A spare (--spares): once the run trains, ask to stand by, and wait until a regroup gives
    this rank a lost rank's slot: return that generation, the spares it brings in (this one
    among them) and the run's published record (the stages' layers); None when the run finished
    without needing it, or when ``leave()`` (a preemption notice) came before a slot did."""
    asked = f"{SPARES}ask/{launch_rank}"
    try:
        while not store.check([CURRENT]):  # the launch is still starting
            if store.check([FINISHED]) or leave():
                return None
            time.sleep(poll_s)
        ask_with_proof(store, asked, launch_rank, fingerprint, token)
        while not store.check([f"{SPARES}taken/{launch_rank}"]):
            store.add(f"{SPARES}beat/{launch_rank}", 1)  # alive: a regroup gives slots only to spares that beat
            if store.check([f"{SPARES}refused/{launch_rank}"]):
                reason = store.get(f"{SPARES}refused/{launch_rank}").decode()
                raise ValueError(f"the live run refused spare rank {launch_rank}: {reason}")
            if store.check([FINISHED]):
                return None
            if leave():
                store.delete_key(asked)  # no longer on offer; a slot given meanwhile is still taken up
                if not store.check([f"{SPARES}taken/{launch_rank}"]):
                    return None
                break
            time.sleep(poll_s)
    except RuntimeError as err:  # the store's host left: the run stopped without finishing
        raise ConnectionError(f"spare rank {launch_rank}: the run's store went away ({str(err).splitlines()[0]}); "
                              "the run stopped without finishing, so this spare stops too") from None  # fmt: skip
    taken = json.loads(store.get(f"{SPARES}taken/{launch_rank}"))
    membership = Membership.from_record(taken)
    before = Membership(0, (), membership.pipeline_size, tuple((slot, spare) for slot, spare in taken["before"]))
    return membership, membership.new_stand_ins(before), json.loads(store.get(CURRENT))
