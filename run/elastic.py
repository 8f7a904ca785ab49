"""An elastic run's changes of replicas (--elastic), for one rank's trainer.

Replicas leave (a rank lost, comm.process_group.ReplicaLostError; or a preemption notice) and
whole replicas join (relaunched ranks asking through the store, comm.membership). Every change
is made at a step boundary by every rank of the new generation: the survivors agree on who
remains, the one communicator moves to the new generation in place (``Communicator.regroup``),
and for a join a live replica of each stage hands the joiners its state. The step itself knows
none of this: it raises ReplicasChanged when a sum over the replicas failed, and the loop asks
this controller to regroup and redo the step.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

import torch
from torch.distributed import Store

from comm.membership import (
    Membership,
    all_done,
    announce_growth,
    growth_after,
    joining_replicas,
    next_membership,
    publish,
    wait_to_join,
)
from comm.process_group import Communicator, PeerLostError
from comm.spares import SparePool, enough_spares
from observability.metrics import setup_logging
from trainer.loop import Trainer
from trainer.resume import probe_disks
from trainer.startup import set_threads
from trainer.state import ReplicasChanged

log = logging.getLogger(__name__)
__all__ = ["ElasticController", "ReplicasChanged", "RollBack"]


class RollBack(Exception):
    """The replicas changed and no live replica can hand the newcomers, or the new layout, its
    state (a spare in the only replica; ZeRO-1's shards): every rank of the new generation loads
    the last checkpoint (``run.entry.roll_back``). ``lost``: progress since it is redone (a
    loss); else the checkpoint is of this very step (committed for a join)."""

    def __init__(self, step: int, events: list[dict], lost: bool = True) -> None:
        super().__init__(f"step {step}: the replicas changed; every rank loads the last checkpoint")
        self.step, self.events, self.lost, self.started = step, events, lost, time.perf_counter()


class ElasticController:
    """Regroups, growth, joins and the hand-over of a stage's state, for ``trainer``'s rank. It
    changes the trainer only through its ``use`` (the new generation's communicator and disks),
    its ``TrainState`` (``state``, ``load_state``: step, data position, loss scale, pending rows)
    and its ``shared_tensors``/``load_shared`` (the stage's trained weights and optimizer state)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.layers_by_stage: list[list[int]] = []  # [first, stop) of each stage, for joiners

    def start(self, layers: range) -> None:
        """At launch, every rank: each stage's layers, published for ranks that join later; the run is live."""
        comm = self.trainer.comm
        spans = comm.all_gather_object([layers.start, layers.stop])
        self.layers_by_stage = [spans[comm.topo.rank_of(s, 0)] for s in range(comm.topo.pipeline_size)]
        self._publish()

    def regroup(self, step: int, why: str = "lost", during: str = "step") -> None:
        """After ReplicasChanged in step ``step`` (or, ``why`` "preempted", after step ``step``,
        which replicas with a preemption notice leave; ``during`` "evaluation" or "checkpoint": in
        that, after step ``step``): agree with the other survivors on the complete pipelines, and with
        --spares on the spares that take lost ranks' places (comm.membership), and move to the new
        generation with this rank's place among them; a live replica of each replaced stage hands
        its spare the state. Metrics rows say who left, and why, and who replaced whom. Raises
        when this replica was left out or fewer replicas remain than the run accepts."""
        trainer = self.trainer
        cfg, started = trainer.cfg, time.perf_counter()
        elastic = trainer.comm.elastic
        settle = min(10.0, cfg.comm.timeout_s)  # how long a slow survivor may take to register
        old = elastic.membership
        membership = next_membership(elastic.store, old, elastic.launch_rank, settle, self._spares())
        gone = sorted(set(old.launch_ranks()) - set(membership.launch_ranks()))
        if not membership.holds(elastic.launch_rank):
            raise PeerLostError(
                f"{trainer.topo.describe(trainer.topo.rank)}: its pipeline lost a rank and the surviving replicas "
                f"went on without it as generation {membership.generation} (no spare was free, or it registered "
                "late); it leaves"
            )
        fewest = cfg.dp.min_replicas if cfg.comm.elastic else cfg.topology.data_size  # only --elastic drops any
        if len(membership.replicas) < fewest:
            raise ConnectionError(
                f"step {step}: launch ranks {gone} were lost and {len(membership.replicas)} complete replicas remain, "
                + (f"fewer than --min-replicas {fewest}" if cfg.comm.elastic else "and no spare was free")
                + "; stopping (relaunch the lost ranks and resume from the last checkpoint)"
            )
        # the survivors whose groups still stand must not tear them down under a peer still reading
        staying = sum(membership.holds(rank) for rank in old.launch_ranks())
        all_done(elastic.store, old, f"the move to generation {membership.generation}", cfg.comm.timeout_s, staying)
        trainer.comm.regroup(membership)
        self._settle()
        stand_ins = membership.new_stand_ins(old)
        left = [r for r in gone if r not in dict(stand_ins)]
        if left:
            took = time.perf_counter() - started
            log.warning("step %d: launch ranks %s left (%s); %d replicas go on as generation %d (regrouped in "
                        "%.2fs); this rank is now %s", step, left, why, len(membership.replicas), membership.generation,
                        took, trainer.topo.describe(trainer.topo.rank))  # fmt: skip
            trainer.state.events.append({"step": step, "event": "replicas left", "reason": why,
                                         "left_launch_ranks": left, "replicas": len(membership.replicas),
                                         "generation": membership.generation, "regroup_s": took,
                                         "unix_time": time.time()})  # fmt: skip
        sources = [self._source(membership, slot, stand_ins) for slot, _ in stand_ins]
        if None in sources or not cfg.dp.replicated:  # no live replica holds what the new generation needs
            self._note_stand_ins(step, membership, stand_ins, time.perf_counter() - started)
            raise RollBack(step, trainer.state.events, lost=why != "preempted")  # (a notice's step is committed)
        for (slot, _), source in zip(stand_ins, sources, strict=True):
            if trainer.topo.stage == slot % old.pipeline_size and trainer.topo.replica == source:
                header, tensors = self._shared_state()
                header["during"] = during  # what the survivors do again with the spare
                trainer.comm.send_to_replica(membership.replicas.index(slot // old.pipeline_size), header,
                                             list(tensors.values()))  # fmt: skip
        self._note_stand_ins(step, membership, stand_ins, time.perf_counter() - started)

    def enough_spares(self, wanted: int) -> bool:
        """Whether ``wanted`` spares wait, admitted and beating (comm.spares), to take the
        places of ranks with a preemption notice: rank 0 looks, and every rank gets its answer."""
        comm = self.trainer.comm
        found = enough_spares(comm.elastic.store, self._spares(), wanted) if comm.topo.rank == 0 else None
        return comm.all_gather_object(found)[0]

    def _spares(self) -> SparePool | None:
        cfg = self.trainer.cfg
        if cfg.comm.spares == 0:
            return None
        return SparePool(cfg.topology.world_size, cfg.comm.spares, cfg.fingerprint(), cfg.comm.run_token)

    @staticmethod
    def _source(membership: Membership, slot: int, new: list[tuple[int, int]]) -> int | None:
        """The replica (in ``membership``'s order) whose rank of ``slot``'s stage hands the spare
        now in ``slot`` its state: the first whose rank there did not just arrive itself (None:
        every copy of the stage was lost, as with one replica)."""
        pp, arrived = membership.pipeline_size, {s for s, _ in new}
        for index, replica in enumerate(membership.replicas):
            if replica * pp + slot % pp not in arrived:
                return index
        return None

    def _note_stand_ins(self, step: int, membership: Membership, stand_ins: list[tuple[int, int]], took: float) -> None:
        """The metrics rows (for the reporter) and log lines of spares taking lost ranks' places."""
        pp = membership.pipeline_size
        for slot, spare in stand_ins:
            log.warning("step %d: spare rank %d took the place of launch rank %d (stage %d of launch replica %d) in "
                        "%.2fs; %d replicas go on as generation %d", step, spare, slot, slot % pp, slot // pp, took,
                        len(membership.replicas), membership.generation)  # fmt: skip
            self.trainer.state.events.append({"step": step, "event": "spare took over", "lost_launch_rank": slot,
                                        "spare_launch_rank": spare, "stage": slot % pp, "launch_replica": slot // pp,
                                        "replicas": len(membership.replicas), "generation": membership.generation,
                                        "takeover_s": took, "unix_time": time.time()})  # fmt: skip

    def _settle(self) -> None:
        """This rank in its communicator's generation (now in ``trainer.topo``): who writes
        checkpoints, threads for the ranks now on this host, heartbeats, the log's prefix; its
        rank 0 publishes the generation for joiners."""
        trainer = self.trainer
        comm = trainer.comm
        trainer.use(comm, probe_disks(comm, trainer.cfg.checkpoint.path))
        set_threads(comm.all_gather_object(socket.gethostname()))
        comm.start_heartbeat()
        setup_logging(comm.topo, trainer.cfg.log_level)  # the log's prefix names the new place
        self._publish()

    def _publish(self) -> None:
        """Rank 0: the generation and each stage's layers, where ranks asking to join read them."""
        comm = self.trainer.comm
        if comm.topo.rank == 0:
            publish(comm.elastic.store, comm.elastic.membership, self.layers_by_stage)

    def grow_if_due(self, commit: Callable[..., None]) -> None:
        """At the end of each step: rank 0 announces whole replicas asking to join (for the end
        of the next step), and every rank takes in those announced for now, a live replica of
        each stage sending them its state (comm.membership); where the state goes through a
        checkpoint, ``commit(must=True)`` commits this step's first (run.supervisor's)."""
        trainer = self.trainer
        elastic, total = trainer.comm.elastic, trainer.cfg.optim.total_steps
        if trainer.topo.rank == 0 and trainer.state.step + 1 < total:
            joining = joining_replicas(elastic.store, elastic.membership, trainer.cfg.topology.data_size,
                                       trainer.cfg.fingerprint(), trainer.cfg.comm.run_token)  # fmt: skip
            if joining:
                announce_growth(elastic.store, elastic.membership, joining, trainer.state.step + 1)
        grown = growth_after(elastic.store, elastic.membership, trainer.state.step)
        if grown is None:
            return
        started = time.perf_counter()
        old = elastic.membership
        replicated = trainer.cfg.dp.replicated
        # every rank decides alike: not from the folder's ``latest``, which its owner may not have
        # moved yet when the others read it (a join due at a checkpoint step hung the run so)
        if not replicated and trainer.committed_step != trainer.state.step:
            commit(must=True)  # what every rank of the grown generation loads (below)
        trainer.comm.quiesce(f"growth after step {trainer.state.step}")
        trainer.comm.regroup(grown)
        self._settle()
        if not replicated:  # the joiners and the new layout of the state: through this step's checkpoint
            self._note_joined(old.replicas, grown, time.perf_counter() - started)
            raise RollBack(trainer.state.step, trainer.state.events, lost=False)
        live = [grown.replicas.index(r) for r in old.replicas]
        if trainer.topo.replica == live[0]:
            header, tensors = self._shared_state()
            for replica in range(len(grown.replicas)):
                if replica not in live:
                    trainer.comm.send_to_replica(replica, header, list(tensors.values()))
        took = time.perf_counter() - started
        new = self._note_joined(old.replicas, grown, took)
        log.warning("step %d: launch ranks %s joined; %d replicas train as generation %d (joined in %.2fs)",
                    trainer.state.step, new, len(grown.replicas), grown.generation, took)  # fmt: skip

    def join(self, store: Store, live: dict) -> None:
        """A rank started again while its elastic run trains (its trainer made with the stage's
        layers as the run has them, and set up where a replica holds all of a stage's state):
        ask to join, and once the run takes this rank's replica in, receive the run's state from
        a live replica of this stage (or, where none holds all of it, load the checkpoint the run
        committed for the join: RollBack)."""
        trainer = self.trainer
        cfg, topo = trainer.cfg, trainer.cfg.topology
        self.layers_by_stage = live["layers"]
        log.info("the elastic run is live (generation %d, launch replicas %s): asking to join", live["generation"],
                 live["replicas"])  # fmt: skip
        membership, record = wait_to_join(store, topo.rank, cfg.fingerprint(), cfg.comm.run_token, cfg.comm.timeout_s)
        started = time.perf_counter()
        comm = Communicator.connect(topo, cfg.comm, torch.device(cfg.device), link_ends=trainer.plan.tied,
                                    side_group=cfg.dp.side_group, store=store, membership=membership)  # fmt: skip
        trainer.use(comm)  # set up before the run took it in (run.entry.join_run): its groups now
        self._settle()
        if not cfg.dp.replicated:  # the live ranks committed this step's checkpoint: every rank loads it
            self._note_joined(record["replicas"], membership, time.perf_counter() - started)
            raise RollBack(trainer.state.step, trainer.state.events, lost=False)
        # the pending rows stay the joiner's own: the reporter's role comes back to it with them
        self._receive_state(membership.replicas.index(min(record["replicas"])), with_events=False)
        took = time.perf_counter() - started
        self._note_joined(record["replicas"], membership, took)
        log.warning("joined at step %d as %s (in %.2fs)", trainer.state.step, comm.topo.describe(comm.topo.rank), took)

    def stand_in(
        self, store: Store, membership: Membership, stand_ins: list[tuple[int, int]], live: dict
    ) -> str | None:
        """A spare given a lost rank's slot (its trainer made for that slot's stage, not set up):
        move into the survivors' new generation, set up, and take the stage's state from a live
        replica of it; raises RollBack when none holds it (the survivors roll back too). Returns
        where the spare starts: None at the step the survivors do again, else after this step
        with its evaluation or its checkpoint's commit."""
        trainer = self.trainer
        cfg, started = trainer.cfg, time.perf_counter()
        self.layers_by_stage = live["layers"]
        trainer.use(Communicator.connect(cfg.topology, cfg.comm, torch.device(cfg.device),
                                         link_ends=trainer.plan.tied, side_group=cfg.dp.side_group,
                                         store=store, membership=membership, launch_rank=cfg.spare_rank))  # fmt: skip
        self._settle()
        source = self._source(membership, cfg.topology.rank, stand_ins)
        if source is None or not cfg.dp.replicated:
            self._note_stand_ins(trainer.state.step, membership, stand_ins, time.perf_counter() - started)
            raise RollBack(trainer.state.step, trainer.state.events)
        trainer.setup(joining=True)
        # with the state, the survivors' rows not written yet: this rank may be the reporter now
        header = self._receive_state(source, with_events=True)
        took = time.perf_counter() - started
        step = trainer.state.step + (header["during"] == "step")  # the step the survivors do again
        self._note_stand_ins(step, membership, stand_ins, took)
        return None if header["during"] == "step" else header["during"]

    def _note_joined(self, before: list[int], now: Membership, took: float) -> list[int]:
        """The metrics row of a join (for the reporter): the launch ranks in ``now`` that the
        launch replicas ``before`` did not hold, and how long taking them in took."""
        trainer = self.trainer
        new = sorted(rank for rank in now.launch_ranks() if rank // now.pipeline_size not in before)
        trainer.state.events.append({"step": trainer.state.step, "event": "replicas joined", "joined_launch_ranks": new,
                               "replicas": len(now.replicas), "generation": now.generation, "join_s": took,
                               "unix_time": time.time()})  # fmt: skip
        return new

    def _shared_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What a joiner or spare needs of this stage: the trainer's state (step, data position,
        loss scale, pending rows) and its trained weights and optimizer state (the frozen rest it
        loads itself), with the tensors' names, shapes and dtypes for the receiver."""
        tensors = self.trainer.shared_tensors()
        header = {**self.trainer.state.state_dict(),
                  "tensors": [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]}  # fmt: skip
        return header, tensors

    def _receive_state(self, source: int, with_events: bool) -> dict:
        """A joiner or spare: take the run's state from this stage's rank in replica ``source``
        (``with_events``: its pending rows too); returns what came with it."""
        trainer = self.trainer
        header, received = trainer.comm.recv_from_replica(source, lambda h: [(s, d) for _, s, d in h["tensors"]])
        trainer.load_shared({name: t for (name, _, _), t in zip(header["tensors"], received, strict=True)})
        state = {k: v for k, v in header.items() if k not in ("tensors", "during") and (with_events or k != "events")}
        trainer.load_state(state)
        return header
