"""Which replicas train in an elastic run (``--elastic``), agreed through the job's store.

A generation is one membership: the launch replicas (``--rank // pp``) whose pipelines are
complete, renumbered in launch order, so ranks keep the layout of ``topology.py``. Generation 0
is the launch; later ones take numbers from a counter in the store, and the process groups of
generation g use the key space ``gen<g>/pg/``, so a generation never reads another's addresses.
Rank 0 of each generation publishes it under ``CURRENT`` once it trains.

When a rank is lost:

- every rank of its pipeline sees a point-to-point or pipeline collective fail (or its heartbeat
  stop), marks itself ``left`` and exits: its closed connections release whoever waits on it;
- the other pipelines see a data-parallel collective fail. They finish the step's pipeline
  all-reduce with a flag instead of stepping (no replica commits a step another did not), and
  each of their ranks registers ``alive`` for the next generation;
- the first rank to see every launch replica decided (all its ranks alive, or one of them left),
  or to wait out the settle time, fixes the next generation with one compare-and-set; all read it.

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

import hmac
import json
import time
from dataclasses import dataclass

import torch.distributed as dist

from comm.admission import TOKEN_ENV, join_proof, read_card
from comm.store_host import CURRENT, FINISHED, PULSE
from comm.topology import Topology

GENERATIONS = "elastic/generations"  # counter: the next generation's number
LAUNCH_SPACE = "gen0/"  # where the launch's ranks passed rank 0's door (its card, comm.admission)


@dataclass(frozen=True)
class Membership:
    generation: int
    replicas: tuple[int, ...]  # the launch replica of each live pipeline, in the new replica order
    pipeline_size: int

    @classmethod
    def at_launch(cls, topo: Topology) -> Membership:
        return cls(0, tuple(range(topo.data_size)), topo.pipeline_size)

    @property
    def key_space(self) -> str:
        return f"gen{self.generation}/"

    def topology(self, launch_rank: int) -> Topology:
        """Where the rank launched as ``launch_rank`` sits in this generation."""
        pp = self.pipeline_size
        return Topology(self.replicas.index(launch_rank // pp) * pp + launch_rank % pp, pp, len(self.replicas))

    def launch_ranks(self) -> list[int]:
        pp = self.pipeline_size
        return [replica * pp + stage for replica in self.replicas for stage in range(pp)]

    def holds(self, launch_rank: int) -> bool:
        return launch_rank // self.pipeline_size in self.replicas


def _record(store: dist.Store, key: str) -> dict | None:
    return json.loads(store.get(key)) if store.check([key]) else None


def publish(store: dist.Store, membership: Membership, layers: list[list[int]]) -> None:
    """Rank 0 of a generation that trains: where joiners find it (and each stage's layers)."""
    record = {"generation": membership.generation, "replicas": list(membership.replicas),
              "pipeline_size": membership.pipeline_size, "layers": layers}  # fmt: skip
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
    """Tell the survivors' agreement that this rank's pipeline is broken (it is about to exit)."""
    store.set(f"{membership.key_space}left/{launch_rank}", reason)


def next_membership(
    store: dist.Store, current: Membership, launch_rank: int, settle_s: float, poll_s: float = 0.05
) -> Membership:
    """Register this (surviving) rank for the generation after ``current`` and return that
    generation's membership, the same on every rank that calls this (module docstring)."""
    space, pp = current.key_space, current.pipeline_size
    store.set(f"{space}alive/{launch_rank}", "1")
    deadline = time.monotonic() + settle_s
    while not store.check([f"{space}next"]):
        alive = {r for r in current.launch_ranks() if store.check([f"{space}alive/{r}"])}
        left = {r for r in current.launch_ranks() if store.check([f"{space}left/{r}"])}
        complete = [rep for rep in current.replicas if all(rep * pp + s in alive for s in range(pp))]
        broken = [rep for rep in current.replicas if any(rep * pp + s in left for s in range(pp))]
        if len(complete) + len(broken) >= len(current.replicas) or time.monotonic() > deadline:
            proposal = {"generation": store.add(GENERATIONS, 1), "replicas": complete}
            store.compare_set(f"{space}next", "", json.dumps(proposal))  # the first proposal wins
            break
        time.sleep(poll_s)
    chosen = json.loads(store.get(f"{space}next"))
    return Membership(chosen["generation"], tuple(chosen["replicas"]), pp)


def ask_to_join(store: dist.Store, generation: int, launch_rank: int, fingerprint: str, token: str | None) -> None:
    """Ask with this rank's settings and, when the run is guarded, a proof of the run token over
    the launch's challenge (comm.admission); a joiner that has a token the run lacks, or lacks
    the one it has, stops here."""
    card = read_card(dist.PrefixStore(LAUNCH_SPACE, store))
    guarded = card is not None and card.guarded
    if guarded != (token is not None):
        raise ConnectionError(
            f"rank {launch_rank}: the live elastic run {'needs' if guarded else 'runs without'} a run token and "
            f"this rank has {'none' if token is None else 'one'}: give every rank the same --run-token (or "
            f"{TOKEN_ENV}), or none at all"
        )
    proof = join_proof(token, card.challenge, launch_rank, fingerprint) if token is not None else ""
    store.set(f"gen{generation}/join/{launch_rank}", f"{fingerprint} {proof}")


def joining_replicas(
    store: dist.Store, current: Membership, launched: int, fingerprint: str, token: str | None
) -> list[int]:
    """Launch replicas (of ``launched``) outside ``current`` whose every rank asks to join with
    these settings (and a valid proof of the run token, when it has one); a rank asking with
    other settings or a wrong proof is refused (rank 0 of the generation asks)."""
    pp, space, ready = current.pipeline_size, current.key_space, []
    challenge = read_card(dist.PrefixStore(LAUNCH_SPACE, store)).challenge if token is not None else ""
    for replica in range(launched):
        if replica in current.replicas:
            continue
        asking = 0
        for rank in range(replica * pp, (replica + 1) * pp):
            if not store.check([f"{space}join/{rank}"]):
                continue
            theirs, _, proof = store.get(f"{space}join/{rank}").decode().partition(" ")
            refused = None
            if theirs != fingerprint:
                refused = "its settings differ from the live run's; start it with the same flags"
            elif token is not None and not hmac.compare_digest(proof, join_proof(token, challenge, rank, theirs)):
                refused = f"its run token is not the run's (give it the run's --run-token or {TOKEN_ENV})"
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
              "replicas": sorted([*current.replicas, *joining])}  # fmt: skip
    store.compare_set(f"{current.key_space}grow", "", json.dumps(record))


def growth_after(store: dist.Store, current: Membership, step: int) -> Membership | None:
    """The generation announced to start after step ``step``, if any (every rank, every step)."""
    record = _record(store, f"{current.key_space}grow")
    if record is None or record["step"] != step:
        return None
    return Membership(record["generation"], tuple(record["replicas"]), current.pipeline_size)


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
        current = Membership(record["generation"], tuple(record["replicas"]), record["pipeline_size"])
        if asked != current.generation:
            ask_to_join(store, current.generation, launch_rank, fingerprint, token)
            asked = current.generation
        if store.check([f"{current.key_space}refused/{launch_rank}"]):
            reason = store.get(f"{current.key_space}refused/{launch_rank}").decode()
            raise ValueError(f"the live elastic run refused rank {launch_rank}: {reason}")
        grown = _record(store, f"{current.key_space}grow")
        if grown is not None and launch_rank // current.pipeline_size in grown["replicas"]:
            return Membership(grown["generation"], tuple(grown["replicas"]), current.pipeline_size), record
        time.sleep(poll_s)
    raise ConnectionError(f"rank {launch_rank} asked for {timeout_s:g}s to join the live elastic run, and was not "
                          "taken in: are all ranks of its replica started?")  # fmt: skip
