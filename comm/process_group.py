"""The process groups of one rank, and the communicator that carries all of its traffic (with
``rendezvous.py`` and the files named below, the only code that calls ``torch.distributed``).

Each pipeline's point-to-point traffic runs on that pipeline's own group (comm.p2p), each
stage's gradient sums on its data-parallel group (comm.collectives), control messages on the
default group (comm.control); with CUDA compute over Gloo their tensors go through pinned host
buffers (``devices.Placement``), over NCCL they stay on the GPU.
"""

from __future__ import annotations

import copy
import logging
import re
import socket
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from comm.collectives import Collectives
from comm.compress import Codec
from comm.config import CommConfig
from comm.control import Control
from comm.decode import DecodePeers
from comm.devices import Placement, check_one_gpu_per_rank, device_identity
from comm.health import Heartbeat, leave_now
from comm.lane import Lane
from comm.link import Wire
from comm.membership import Membership, all_done, mark_left, mark_lost
from comm.p2p import PipelinePeers
from comm.rendezvous import bind_interface, join_job, restart_attempt, store_address
from comm.store_host import FINISHED, PULSE
from comm.topology import Topology
from comm.trace import NULL_TRACER, NullTracer, Tracer

log = logging.getLogger(__name__)


class PeerLostError(ConnectionError):
    """A collective or point-to-point call failed because a peer died, hung or dropped off."""


class ReplicaLostError(PeerLostError):
    """Elastic runs: a data-parallel collective failed, so another replica lost a rank; this
    rank's own pipeline may still be whole (``comm.membership``)."""


@dataclass(frozen=True)
class Elastic:
    """What an elastic rank keeps across generations: the store's client, the generation it is
    in, and the rank it was launched as (its name in the store)."""

    store: dist.Store
    membership: Membership
    launch_rank: int


def nccl_groups(topo: Topology, backend: str, dp_backend: str) -> list[list[int]]:
    """The ranks of every NCCL group of two or more that ``Communicator`` makes."""
    groups = []
    if backend == "nccl" and topo.pipeline_size > 1:
        groups += [topo.pipeline_ranks(r) for r in range(topo.data_size)]  # the tied ends lie within these
    if dp_backend == "nccl" and topo.data_size > 1:
        groups += [topo.data_ranks(s) for s in range(topo.pipeline_size)]
    return groups


class Communicator(PipelinePeers, DecodePeers, Collectives, Control, Wire):
    """One rank's process groups and all of its traffic: the pipeline's point-to-point
    (comm.p2p; generation's, comm.decode), collectives (comm.collectives), control
    (comm.control), each send counted and held to an emulated link (comm.link). This file makes
    the groups (and again after an elastic regroup), turns failures into errors naming the lost
    peer, and leaves the job."""

    def __init__(
        self, topo: Topology, cfg: CommConfig, device: torch.device, link_ends: bool = False,
        side_group: bool = False, elastic: Elastic | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.link_ends, self.side_group = cfg, link_ends, side_group  # for regroup()
        self.device = device
        self.timeout_s = cfg.timeout_s
        self.tracer: Tracer | NullTracer = NULL_TRACER  # set by the trainer when profiling
        self.act_codec = Codec(cfg.pp_compress, cfg.pp_compress_group, cfg.pp_compress_outliers)
        # gradients round stochastically (unbiased, so what rounds away does not pile up over
        # steps) and carry no exact outliers: the outlier channels are the activations' (compress.py)
        self.grad_codec = Codec(cfg.pp_compress_grad, cfg.pp_compress_group, outliers=0, stochastic=True)
        self.link = (cfg.link_bandwidth_mbps, cfg.link_latency_ms) if cfg.emulates_link else None
        self.bytes_sent = 0  # point-to-point bytes this rank put on the wire
        self.dp_bytes_sent = 0  # and bytes of data-parallel collectives
        # Gloo moves CPU tensors only: with CUDA compute its groups' tensors go through host buffers.
        stage_gloo = device.type != "cpu" or cfg.host_staging
        self.pp_place = Placement(device, staged=cfg.backend == "gloo" and stage_gloo)
        self.dp_place = Placement(device, staged=cfg.dp_backend == "gloo" and stage_gloo)
        self._dp_gloo = cfg.dp_backend == "gloo"
        self._barrier_devices = [device.index] if cfg.backend == "nccl" else None  # NCCL's barrier needs it
        self._make_groups(topo, elastic)

    def _make_groups(self, topo: Topology, elastic: Elastic | None) -> None:
        """This rank's place and process groups in the job (an elastic run: in one generation of
        it), and its heartbeat; the default group is made already (``join_job``)."""
        cfg, device = self.cfg, self.device
        self.topo = topo
        self.elastic = elastic
        self.heartbeat: Heartbeat | None = None  # started last; _guard reads it from the first call
        self._left = False  # an elastic replica that left on purpose (``leave``)
        self._in_flight: list[tuple[list, list]] = []  # sends not yet waited for, with their tensors
        self._lane: Lane | None = None  # in_background's thread, started at its first job
        self._check_one_gpu_per_rank(nccl_groups(topo, cfg.backend, cfg.dp_backend))
        timeout = timedelta(seconds=cfg.timeout_s)
        # new_group must be called by every rank in the same order, members or not.
        self._pipeline_group = None
        self._data_group = None
        self._ends_group = None
        self._side_group = None
        if self.link_ends and topo.pipeline_size > 1:
            for replica in range(topo.data_size):
                ends = [topo.rank_of(0, replica), topo.rank_of(topo.pipeline_size - 1, replica)]
                group = dist.new_group(ends, timeout=timeout, backend=cfg.backend)
                if topo.replica == replica and (topo.is_first_stage or topo.is_last_stage):
                    self._ends_group = group
        if topo.pipeline_size > 1:
            for replica in range(topo.data_size):
                group = dist.new_group(topo.pipeline_ranks(replica), timeout=timeout, backend=cfg.backend)
                if replica == topo.replica:
                    self._pipeline_group = group
        if topo.data_size > 1:
            for stage in range(topo.pipeline_size):
                group = dist.new_group(topo.data_ranks(stage), timeout=timeout, backend=cfg.dp_backend)
                if stage == topo.stage:
                    self._data_group = group
        if self.side_group and topo.data_size > 1:  # see side_channel()
            for stage in range(topo.pipeline_size):
                group = dist.new_group(topo.data_ranks(stage), timeout=timeout, backend=cfg.dp_backend)
                if stage == topo.stage:
                    self._side_group = group
        # NCCL makes a group's communicator at its first call, and a batch of point-to-point
        # operations must then involve every rank of the group; a first all-reduce by all
        # members, group by group in the order made above (so no two ranks wait on each other
        # crosswise), makes them now. A failure here is then a start-up error, not a mid-step one.
        for group, backend in ((self._ends_group, cfg.backend), (self._pipeline_group, cfg.backend),
                               (self._data_group, cfg.dp_backend), (self._side_group, cfg.dp_backend)):  # fmt: skip
            if group is not None and backend == "nccl":
                with self._guard("creation of the NCCL communicators"):
                    dist.all_reduce(torch.zeros(1, device=device), group=group)
        # Control messages (start-up checks, clock sync, the final barrier) use the default
        # group, which is Gloo on the CPU whatever the pipeline's backend.
        address = store_address(cfg.dist_url)
        # Dead or frozen peers are caught by their missing heartbeats well before the timeout.
        # Under NCCL this is also how a lost peer is noticed at all: NCCL's waits return at once
        # and its errors surface later, in its own watchdog thread.
        dead_after = min(30.0, cfg.timeout_s)
        if elastic is not None:  # a lost rank elsewhere is the data-parallel collectives' business
            # with spares this rank outlives a lost peer of its pipeline: its own calls fail, and it regroups
            on_lost = self._leave if cfg.spares == 0 else self._stay
            self.heartbeat = Heartbeat(
                *address, topo, dead_after, key_prefix=elastic.membership.key_space, on_lost=on_lost,
                watch=topo.pipeline_ranks(topo.replica), pulse_key=PULSE,
            )  # fmt: skip
        else:
            prefix = restart_attempt(cfg.dist_url) or ""
            self.heartbeat = Heartbeat(*address, topo, dead_after, key_prefix=prefix) if address else None

    def _check_one_gpu_per_rank(self, groups: list[list[int]]) -> None:
        """Before any NCCL group: every rank says which GPU it has, and two members of one NCCL
        group on one GPU stop every rank (ranks in Gloo groups only may share a GPU)."""
        if not groups:
            return
        mine = (device_identity(self.device), f"{self.device} on {socket.gethostname()}")
        everyone: list = [None] * self.topo.world_size
        with self._guard("start-up exchange of devices"):
            dist.all_gather_object(everyone, mine)
        check_one_gpu_per_rank([e[0] for e in everyone], [e[1] for e in everyone], self.topo.describe, groups)

    @classmethod
    def connect(
        cls, topo: Topology, cfg: CommConfig, device: torch.device, link_ends: bool = False, side_group: bool = False,
        store: dist.Store | None = None, membership: Membership | None = None, launch_rank: int | None = None,
    ) -> Communicator:  # fmt: skip
        """Join the job; a master that cannot be reached is a one-line error after the timeout.

        ``link_ends`` adds a group joining the first and last stage of each pipeline (for
        weights both ends hold, such as tied embeddings); ``side_group`` a second data-parallel
        group for ``side_channel``. An elastic run passes its ``store`` (``elastic_store``) and
        the generation to join: by default the launch's, where ``topo`` is this rank's place;
        ``launch_rank`` is this process's name in the store when that is not ``topo.rank`` (a spare).
        """
        if cfg.net_interface:
            bind_interface(cfg.net_interface)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL makes its communicators on the current device
        if not cfg.regroups:
            join_job(topo, cfg.dist_url, cfg.timeout_s, token=cfg.run_token)
            return cls(topo, cfg, device, link_ends, side_group)
        launch_rank = topo.rank if launch_rank is None else launch_rank
        elastic = Elastic(store, membership or Membership.at_launch(topo), launch_rank)
        topo = elastic.membership.topology(elastic.launch_rank)
        # the launch's ranks pass rank 0's door; a joiner proved the token when it asked (comm.membership)
        join_job(topo, cfg.dist_url, cfg.timeout_s, store, elastic.membership.key_space, token=cfg.run_token,
                 admit=membership is None)  # fmt: skip
        return cls(topo, cfg, device, link_ends, side_group, elastic)

    def regroup(self, membership: Membership) -> None:
        """Move this communicator to generation ``membership`` (an elastic run whose replicas
        changed): every process group is made anew over the store's key space of that
        generation, with this rank's place in it (``topo``). It stays the same object, so whoever
        holds it (the trainer, the optimizer, the profiler) holds the new generation's; its byte
        counts and tracer go on. Nothing may be in flight."""
        if self.heartbeat is not None:
            self.heartbeat.stop("done")  # done with this generation: not a loss to its peers
        self._close_lane()
        self._pipeline_group = self._data_group = self._ends_group = self._side_group = None
        if dist.is_initialized():  # (``abandon`` may have torn them down already)
            dist.destroy_process_group()
        elastic = Elastic(self.elastic.store, membership, self.elastic.launch_rank)
        topo = membership.topology(elastic.launch_rank)
        join_job(topo, self.cfg.dist_url, self.timeout_s, elastic.store, membership.key_space, admit=False)
        self._make_groups(topo, elastic)

    def _leave(self, message: str) -> None:
        """Elastic runs without spares: this rank's pipeline lost a rank (so this replica is
        gone); say so where the survivors' agreement looks, and exit at once, which closes this
        rank's connections and releases every peer waiting on it."""
        self._mark_gone(message)
        leave_now(f"{message}; stopping")

    @staticmethod
    def _stay(message: str) -> None:
        """Runs with spares: a lost peer of this pipeline is replaced, and this rank regroups."""
        log.warning("%s; this rank stays and regroups with a spare in its place", message)

    def _mark_gone(self, reason: str, on_purpose: bool = False) -> None:
        """Elastic runs: the survivors' agreement must not wait for this rank (which a spare may
        replace, unless its replica leaves ``on_purpose``)."""
        if self.elastic is None:
            return
        mark = mark_left if on_purpose else mark_lost
        try:
            mark(self.elastic.store, self.elastic.membership, self.elastic.launch_rank, reason)
        except RuntimeError:
            pass  # the store itself is gone: nobody is left to regroup

    def abandon(self, failure: BaseException) -> None:
        """A peer was lost during a step, an evaluation or a checkpoint's commit (``failure``
        says so), and this rank will regroup instead of exiting. Tear down every process group
        of this generation now: that closes their connections, so a peer still waiting on this
        rank (a stage further along its pipeline, another replica in a gradient sum, any rank in
        a control exchange) fails at once too instead of waiting out the timeout. A group stays
        connected while anything references it, and the frames of the failed call, kept by the
        failure's traceback, do: their locals are cleared first."""
        while failure is not None:
            traceback.clear_frames(failure.__traceback__)
            failure = failure.__context__
        self._close_lane()
        self._ends_group = self._pipeline_group = self._data_group = self._side_group = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def side_channel(self) -> Communicator:
        """This communicator with its data-parallel collectives on the second group over the same
        replicas (``side_group``), for a background thread to sum there while this one goes on
        using the first: a group's collectives are matched by the order they are called in, which
        two threads sharing a group would not keep. It counts its own bytes in ``dp_bytes_sent``."""
        if self._data_group is not None and self._side_group is None:
            raise RuntimeError("side_channel() needs a communicator connected with side_group=True")
        side = copy.copy(self)
        side._data_group, side._side_group = self._side_group, None
        side.dp_bytes_sent = 0
        return side

    @contextmanager
    def _guard(self, what: str, peer: int | None = None, data: bool = False) -> Iterator[None]:
        """Turn a failed call into one line naming the lost peer (or what the heartbeats know).
        A failed data-parallel call (``data``) of an elastic run is a ReplicaLostError, and first
        tears down this rank's data-parallel groups: that closes their connections, so the other
        members fail at once too instead of waiting on this rank (a ring of three or more)."""
        try:
            yield
        except RuntimeError as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            reason = re.sub(r"^\[[^\]]*\]\s*", "", reason).split(". This is typically")[0]  # Gloo's source location
            if "imed out" in reason:
                reason = f"no answer within --comm-timeout {self.timeout_s:g}s"
            if data and self.elastic is not None:
                groups = [g for g in (self._data_group, self._side_group) if g is not None]
                self._data_group = self._side_group = None
                while groups:  # no reference left here: a referenced group stays connected (``abandon``)
                    try:
                        dist.destroy_process_group(groups.pop())
                    except ValueError:
                        pass  # torn down already, by the side channel that shares it
                me = self.topo.describe(self.topo.rank)
                raise ReplicaLostError(f"{me}: another replica was lost during {what} ({reason})") from None
            who = f"lost {self.topo.describe(peer)}" if peer is not None else "a peer failed"
            known = self.heartbeat.describe_lost() if self.heartbeat else ""
            raise PeerLostError(
                f"{self.topo.describe(self.topo.rank)}: {who} during {what} ({reason})"
                + (f"; {known}" if known else "")
            ) from None

    def start_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.start()

    def quiesce(self, tag: str) -> None:
        """Elastic runs, before a planned change of generation (a join, a preemption notice; not
        after a loss, where the lost ranks would never come): wait until every rank of this
        generation is done with its process groups (comm.membership.all_done)."""
        all_done(self.elastic.store, self.elastic.membership, tag, self.timeout_s)

    def leave(self, reason: str, replaceable: bool = False) -> None:
        """Elastic runs: this rank's replica leaves on purpose (a preemption notice) while the
        others train on (or, ``replaceable``, this rank leaves and a spare takes its place): no
        loss for its peers' heartbeats, a mark for the survivors' agreement, no final barrier
        (the survivors do not wait for it); ``close`` is then a no-op."""
        if self.heartbeat is not None:
            self.heartbeat.stop("done")
        self._close_lane()
        self._mark_gone(reason, on_purpose=not replaceable)
        self._left = True

    def close(self, error: str | None = None) -> None:
        """Leave the job: after a clean run wait for every rank (rank 0 hosts the store the
        others still use); after an error, tell the others why and go."""
        if self._left:
            return
        if self.heartbeat is not None:
            self.heartbeat.stop("done" if error is None else error)
        self._close_lane()
        if error is not None:
            self._mark_gone(error)
            return  # tearing down groups can wait on a frozen peer; the process is about to exit
        with self._guard("final barrier"):
            dist.barrier()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.elastic is not None and self.topo.rank == 0:  # every rank has passed the barrier
            self.elastic.store.set(FINISHED, "1")
