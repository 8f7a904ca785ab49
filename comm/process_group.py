"""The process groups of one rank and every tensor it exchanges (with ``rendezvous.py``, the
only code that calls ``torch.distributed``).

Point-to-point helpers do nothing at the ends of the pipeline (the first stage receives no
activations, the last sends none), so one schedule loop serves every stage. Each pipeline's
point-to-point traffic runs on that pipeline's own group and each stage's gradient sums on its
data-parallel group; with CUDA compute over Gloo their tensors go through pinned host buffers
(``devices.Placement``), over NCCL they stay on the GPU.
"""

from __future__ import annotations

import copy
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from comm.compress import Codec
from comm.config import CommConfig
from comm.devices import Placement, check_one_gpu_per_rank, device_identity
from comm.health import Heartbeat, leave_now
from comm.lane import Lane, Pending
from comm.membership import Membership, mark_left
from comm.rendezvous import bind_interface, join_job, restart_attempt, store_address
from comm.store_host import FINISHED, PULSE
from comm.topology import Topology
from comm.trace import NULL_TRACER, NullTracer, Tracer

log = logging.getLogger(__name__)
# Values of each replica's slice a Gloo reduce-scatter or all-gather moves at once (64 MB of
# fp32): Gloo copies the whole buffer it is handed, so this bounds that copy; a few calls per
# step keep the latency paid per call small.
GLOO_CHUNK = 1 << 24


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


POSITION_DTYPE = torch.int32  # token positions on the wire (a sequence is far shorter than 2**31)


@dataclass(frozen=True)
class Message:
    """What crosses a pipeline link: an activation or its gradient (``tensor``, through the link's
    codec) and, sent exactly beside it where the step needs them: ``side``, fp32 values that
    travel both ways (a mixture of experts' router sums, modules.routing), and ``positions``,
    the tokens' position ids (micro, seq), forward only (examples packed apart, trainer.data)."""

    tensor: torch.Tensor
    side: torch.Tensor | None = None
    positions: torch.Tensor | None = None


@dataclass(frozen=True)
class Expected:
    """What a pipeline receive expects: the tensor's shape and dtype before the link's codec,
    ``side`` fp32 values beside it (0: none), and whether the tokens' positions come too."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    side: int = 0
    positions: bool = False

    def extras(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """The exact wire tensors after the codec's, in the order ``Communicator._outgoing`` sends them."""
        side = [((self.side,), torch.float32)] if self.side else []
        return side + ([(self.shape[:-1], POSITION_DTYPE)] if self.positions else [])


@dataclass
class PendingRecv:
    """A posted receive; ``wait()`` returns the decoded message (None for a pipeline end)."""

    comm: Communicator | None
    lane: str = ""
    what: str = ""
    peer: int = -1
    works: list = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    codec: Codec | None = None
    expected: Expected | None = None
    sending: list[torch.Tensor] = field(default_factory=list)  # an exchange's outgoing wire, alive until wait()

    def wait(self) -> Message | None:
        """Under NCCL ``work.wait()`` only orders the compute stream after the transfer (the
        CPU goes on); under Gloo it blocks until the data is here."""
        if self.comm is None:
            return None
        with self.comm.tracer.span(self.lane), self.comm._guard(self.what, self.peer):
            for work in self.works:
                work.wait()
        place, expected = self.comm.pp_place, self.expected
        received = [place.incoming(b) for b in self.buffers]
        coded = len(received) - len(expected.extras())
        extras = iter(received[coded:])
        side = next(extras) if expected.side else None
        positions = next(extras).long() if expected.positions else None
        return Message(self.codec.decode(received[:coded], expected.dtype), side, positions)


NOTHING = PendingRecv(None)  # what a pipeline end receives from beyond itself


class Communicator:
    """Process groups of one rank and the collectives the trainer uses."""

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
            self.heartbeat = Heartbeat(
                *address, topo, dead_after, key_prefix=elastic.membership.key_space, on_lost=self._leave,
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
        store: dist.Store | None = None, membership: Membership | None = None,
    ) -> Communicator:  # fmt: skip
        """Join the job; a master that cannot be reached is a one-line error after the timeout.

        ``link_ends`` adds a group joining the first and last stage of each pipeline (for
        weights both ends hold, such as tied embeddings); ``side_group`` a second data-parallel
        group for ``side_channel``. An elastic run passes its ``store`` (``elastic_store``) and
        the generation to join: by default the launch's, where ``topo`` is this rank's place.
        """
        if cfg.net_interface:
            bind_interface(cfg.net_interface)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL makes its communicators on the current device
        if not cfg.elastic:
            join_job(topo, cfg.dist_url, cfg.timeout_s, token=cfg.run_token)
            return cls(topo, cfg, device, link_ends, side_group)
        elastic = Elastic(store, membership or Membership.at_launch(topo), topo.rank)
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
        dist.destroy_process_group()
        elastic = Elastic(self.elastic.store, membership, self.elastic.launch_rank)
        topo = membership.topology(elastic.launch_rank)
        join_job(topo, self.cfg.dist_url, self.timeout_s, elastic.store, membership.key_space, admit=False)
        self._make_groups(topo, elastic)

    def send_to_replica(self, replica: int, header: object, tensors: list[torch.Tensor]) -> None:
        """Send ``header`` (pickled: our own small dicts) and ``tensors`` to this stage's rank in
        ``replica``, over the data-parallel group (a live replica handing a joiner its state)."""
        peer = self.topo.rank_of(self.topo.stage, replica)
        sent = sum(t.nbytes for t in tensors)
        self.dp_bytes_sent += sent
        with self.tracer.span("data-parallel comm"), self._guard("sending state to a joining replica", peer):
            self._hold_link(sent)
            dist.send_object_list([header], dst=peer, group=self._data_group)
            for wire in self.dp_place.outgoing([t.contiguous() for t in tensors]):
                dist.send(wire, dst=peer, group=self._data_group)

    def recv_from_replica(
        self, replica: int, buffers_for: Callable[[object], list[tuple[tuple[int, ...], torch.dtype]]]
    ) -> tuple[object, list[torch.Tensor]]:
        """Receive what ``send_to_replica`` sends from this stage's rank in ``replica``; the
        tensors' shapes and dtypes come from ``buffers_for(header)``."""
        peer = self.topo.rank_of(self.topo.stage, replica)
        with self.tracer.span("data-parallel comm"), self._guard("receiving state from a live replica", peer):
            box: list[object] = [None]
            dist.recv_object_list(box, src=peer, group=self._data_group)
            received = [self.dp_place.buffer(shape, dtype) for shape, dtype in buffers_for(box[0])]
            for buffer in received:
                dist.recv(buffer, src=peer, group=self._data_group)
        return box[0], [self.dp_place.incoming(t) for t in received]

    def _leave(self, message: str) -> None:
        """Elastic runs: this rank's pipeline lost a rank (so this replica is gone); say so where
        the survivors' agreement looks, and exit at once, which closes this rank's connections
        and releases every peer waiting on it."""
        self._mark_left(message)
        leave_now(message)

    def _mark_left(self, reason: str) -> None:
        """Elastic runs: the survivors' agreement must not wait for this rank."""
        if self.elastic is None:
            return
        try:
            mark_left(self.elastic.store, self.elastic.membership, self.elastic.launch_rank, reason)
        except RuntimeError:
            pass  # the store itself is gone: nobody is left to regroup

    def side_channel(self) -> Communicator:
        """This communicator with its data-parallel collectives on the second group over the same
        replicas (``side_group``), for a background thread to sum there while this one goes on
        using the first: a group's collectives are matched by the order they are called in, which
        two threads sharing a group would not keep. It counts its own bytes in ``dp_bytes_sent``."""
        if self._data_group is not None and self._side_group is None:
            raise RuntimeError("side_channel() needs a communicator connected with side_group=True")
        side = copy.copy(self)
        side._data_group = self._side_group
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
                for group in groups:
                    dist.destroy_process_group(group)
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

    # -- pipeline point-to-point; no-ops at the ends ------------------------------------------

    def _hold_link(self, nbytes: int) -> None:
        """Link emulation: hold what this rank sends (to the next or previous stage, or to other
        replicas) to --link-bandwidth-mbps and --link-latency-ms; one latency per message or collective."""
        if self.link is not None and nbytes:
            bandwidth_mbps, latency_ms = self.link
            time.sleep(latency_ms / 1e3 + (nbytes * 8 / (bandwidth_mbps * 1e6) if bandwidth_mbps else 0.0))

    def _outgoing(self, message: Message, codec: Codec) -> list[torch.Tensor]:
        """``message`` as wire tensors where the pipeline's backend reads them, counted and
        (under link emulation) held to the link's rate. Encoding runs on the compute device."""
        wire = codec.encode(message.tensor.detach())
        if message.side is not None:
            wire.append(message.side.detach().float())
        if message.positions is not None:
            wire.append(message.positions.to(POSITION_DTYPE))
        sent = sum(w.nbytes for w in wire)
        self.bytes_sent += sent
        self._hold_link(sent)
        return self.pp_place.outgoing(wire)

    def _incoming(self, expected: Expected, codec: Codec) -> list[torch.Tensor]:
        wire = codec.wire(expected.shape, expected.dtype) + expected.extras()
        return [self.pp_place.buffer(s, d) for s, d in wire]

    def _p2p(self, op: Callable, tensor: torch.Tensor, peer: int) -> dist.P2POp:
        """On the pipeline's own group: under NCCL its communicator holds this pipeline's ranks only."""
        return dist.P2POp(op, tensor, peer, group=self._pipeline_group)

    def _send(self, lane: str, what: str, peer: int, message: Message, codec: Codec, wait: bool) -> None:
        """Send to one peer. ``wait=False`` leaves the send in flight until ``flush()``, so moving
        one micro-batch overlaps computing the next."""
        wire = self._outgoing(message, codec)
        with self.tracer.span(lane), self._guard(what, peer):
            works = dist.batch_isend_irecv([self._p2p(dist.isend, w, peer) for w in wire])
            if wait:
                for work in works:
                    work.wait()
            else:
                self._in_flight.append((works, wire))

    def _post_recv(self, lane: str, what: str, peer: int, expected: Expected, codec: Codec) -> PendingRecv:
        """Post a receive now and wait for it later: the transport (Gloo included) moves the
        data only once a receive is posted, so posting before a compute overlaps the two."""
        buffers = self._incoming(expected, codec)
        with self._guard(what, peer):
            works = dist.batch_isend_irecv([self._p2p(dist.irecv, b, peer) for b in buffers])
        return PendingRecv(self, lane, what, peer, works, buffers, codec, expected)

    def _post_exchange(
        self, lane: str, what: str, peer: int, message: Message, send_codec: Codec, expected: Expected,
        recv_codec: Codec,
    ) -> PendingRecv:  # fmt: skip
        """Send to and receive from one peer in one batch; ``wait()`` waits for both. NCCL runs
        the operations between two ranks in order on one stream: a send and a receive in opposite
        directions posted apart could each wait behind the other side's (a deadlock)."""
        wire, buffers = self._outgoing(message, send_codec), self._incoming(expected, recv_codec)
        ops = [self._p2p(dist.isend, w, peer) for w in wire] + [self._p2p(dist.irecv, b, peer) for b in buffers]
        with self._guard(what, peer):
            works = dist.batch_isend_irecv(ops)
        return PendingRecv(self, lane, what, peer, works, buffers, recv_codec, expected, sending=wire)

    def flush(self) -> None:
        """Wait for every send still in flight (before the next phase reuses the link)."""
        with self.tracer.span("forward send", "flush"), self._guard("completion of sends"):
            for works, _ in self._in_flight:
                for work in works:
                    work.wait()
        self._in_flight.clear()

    def post_recv_forward(self, expected: Expected) -> PendingRecv:
        """The previous stage's activations (``wait()`` gives None on the first stage)."""
        if self.topo.is_first_stage:
            return NOTHING
        return self._post_recv("forward recv", "receive of activations", self.topo.rank - 1, expected, self.act_codec)

    def post_recv_backward(self, expected: Expected) -> PendingRecv:
        """The gradient of our output from the next stage (``wait()`` gives None on the last stage)."""
        if self.topo.is_last_stage:
            return NOTHING
        return self._post_recv("backward recv", "receive of gradients", self.topo.rank + 1, expected, self.grad_codec)

    def recv_forward(self, expected: Expected) -> Message | None:
        return self.post_recv_forward(expected).wait()

    def recv_backward(self, expected: Expected) -> Message | None:
        return self.post_recv_backward(expected).wait()

    def send_forward(self, message: Message, wait: bool = True) -> None:
        if not self.topo.is_last_stage:
            self._send("forward send", "send of activations", self.topo.rank + 1, message, self.act_codec, wait)

    def send_backward(self, message: Message | None, wait: bool = True) -> None:
        if not self.topo.is_first_stage:
            if message is None:
                raise RuntimeError("no gradient to send back: the stage input did not require grad")
            self._send("backward send", "send of gradients", self.topo.rank - 1, message, self.grad_codec, wait)

    def send_forward_recv_backward(self, message: Message, expected: Expected) -> Message | None:
        """1F1B steady state: our activations out and their gradient in, with the next stage."""
        if self.topo.is_last_stage:
            return None
        return self._post_exchange("forward send", "activation/gradient exchange", self.topo.rank + 1,
                                   message, self.act_codec, expected, self.grad_codec).wait()  # fmt: skip

    def send_backward_recv_forward(self, message: Message | None, expected: Expected) -> Message | None:
        """1F1B steady state: our input's gradient out and the next activations in."""
        return self.post_send_backward_recv_forward(message, expected).wait()

    def post_send_backward_recv_forward(self, message: Message | None, expected: Expected) -> PendingRecv:
        """The same, posted: ``wait()`` gives the activations (None on the first stage), so the
        zero-bubble schedule computes weight gradients while both travel."""
        if self.topo.is_first_stage:
            return NOTHING
        if message is None:
            raise RuntimeError("no gradient to send back: the stage input did not require grad")
        return self._post_exchange("backward send", "gradient/activation exchange", self.topo.rank - 1,
                                   message, self.grad_codec, expected, self.act_codec)  # fmt: skip

    # -- collectives --------------------------------------------------------------------------

    def in_background(self, job: Callable[[], object]) -> Pending:
        """Run ``job``, which calls this communicator's data-parallel collectives, on a thread of
        this communicator's own (comm.lane), after the jobs handed in before it; meanwhile the
        caller must issue no data-parallel collective itself, or the replicas' orders could differ."""
        if self._lane is None:
            self._lane = Lane(f"data-parallel lane of rank {self.topo.rank}", self.device)
        return self._lane.submit(job)

    def _close_lane(self) -> None:
        if self._lane is not None:
            self._lane.close()
            self._lane = None

    def _all_reduce(self, tensor: torch.Tensor, group: dist.ProcessGroup, place: Placement) -> None:
        """Sum ``tensor`` in place over ``group``, through host buffers where ``place`` says so."""
        (wire,) = place.outgoing([tensor])
        dist.all_reduce(wire, group=group)
        place.copy_back(tensor, wire)

    def all_reduce_data(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place over this stage's data-parallel replicas."""
        if self._data_group is not None:
            # a ring all-reduce sends 2(n-1)/n of the buffer from each rank
            sent = 2 * (self.topo.data_size - 1) * tensor.nbytes // self.topo.data_size
            self.dp_bytes_sent += sent
            with self.tracer.span("data-parallel comm"), self._guard("data-parallel all-reduce", data=True):
                self._hold_link(sent)
                self._all_reduce(tensor, self._data_group, self.dp_place)

    def reduce_scatter_data(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over this stage's replicas and keep this replica's equal slice of the
        sum in ``output`` (replica r: the r-th of ``data_size`` slices; it may be that slice of
        ``tensor`` itself). A ring sends (n-1)/n of the buffer from each rank: half an all-reduce."""
        n, size = self.topo.data_size, output.numel()
        for a, b in self._dp_chunks(size):
            # a chunk takes the same columns of every replica's slice; the whole buffer needs no copy
            piece = tensor if b - a == size else tensor.view(n, size)[:, a:b].contiguous().view(-1)
            sent = (n - 1) * piece.nbytes // n
            self._into(dist.reduce_scatter_single, output[a:b], piece, sent, "data-parallel reduce-scatter")

    def all_gather_data_into(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        """Every replica's ``tensor`` laid end to end in replica order, written into ``output``
        (the other half of an all-reduce: what reduce_scatter_data split, put back together);
        ``tensor`` may be this replica's slice of ``output`` itself."""
        n, size = self.topo.data_size, tensor.numel()
        for a, b in self._dp_chunks(size):
            # NCCL gathers in place; under Gloo a chunk lands in a buffer of its own first (also
            # when it is the whole: Gloo is then never handed an input inside its output)
            gathered = torch.empty(n * (b - a), dtype=output.dtype, device=output.device) if self._dp_gloo else output
            sent = (n - 1) * tensor[a:b].nbytes
            self._into(dist.all_gather_single, gathered, tensor[a:b], sent, "data-parallel all-gather")
            if gathered is not output:
                output.view(n, size)[:, a:b].copy_(gathered.view(n, b - a))

    def scratch_bytes(self, size: int, itemsize: int) -> int:
        """Memory reduce_scatter_data and all_gather_data_into take for a moment, for slices of
        ``size`` values: under Gloo a chunk of every replica's slice, copied, and Gloo's own copy."""
        if self._data_group is None or not self._dp_gloo:
            return 0
        return 2 * self.topo.data_size * min(GLOO_CHUNK, size) * itemsize

    def _dp_chunks(self, size: int) -> list[tuple[int, int]]:
        """Column ranges for reduce_scatter_data and all_gather_data_into. Gloo copies the whole
        buffer it is handed (measured: a 0.4 GB reduce-scatter or all-gather took 0.4 GB more),
        so it gets ``GLOO_CHUNK`` values of each replica's slice at a time; NCCL works in place."""
        chunk = GLOO_CHUNK if self._dp_gloo else max(1, size)
        return [(a, min(size, a + chunk)) for a in range(0, max(1, size), chunk)]

    def _into(self, collective: Callable, output: torch.Tensor, tensor: torch.Tensor, sent: int, what: str) -> None:
        """Run a data-parallel ``collective(output, input)``, through host buffers where needed."""
        if self._data_group is None:
            output.copy_(tensor)  # one replica: its slice is the whole
            return
        self.dp_bytes_sent += sent
        place = self.dp_place
        (wire,) = place.outgoing([tensor])
        received = output if not place.staged else place.buffer(output.shape, output.dtype)
        with self.tracer.span("data-parallel comm"), self._guard(what, data=True):
            self._hold_link(sent)
            collective(received, wire, group=self._data_group)
        place.copy_back(output, received)

    def all_gather_data(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every replica's ``tensors`` (same shapes everywhere), by replica."""
        if self._data_group is None:
            return [tensors]
        place = self.dp_place
        wire = place.outgoing([t.contiguous() for t in tensors])
        gathered = [[place.buffer(t.shape, t.dtype) for t in tensors] for _ in range(self.topo.data_size)]
        sent = (self.topo.data_size - 1) * sum(t.nbytes for t in tensors)
        self.dp_bytes_sent += sent
        with self.tracer.span("data-parallel comm"), self._guard("data-parallel all-gather", data=True):
            self._hold_link(sent)
            for i, tensor in enumerate(wire):
                dist.all_gather([g[i] for g in gathered], tensor, group=self._data_group)
        return [[place.incoming(t) for t in replica] for replica in gathered]

    def all_to_all_data(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor's i-th slice along dim 0 (of ``data_size``) goes to replica i; returns, per
        tensor, the slices every replica sent this one, in replica order along dim 0. Each rank
        sends (n-1)/n of them."""
        if self._data_group is None:
            return tensors
        n, place = self.topo.data_size, self.dp_place
        wire = place.outgoing([t.contiguous() for t in tensors])
        received = [place.buffer(t.shape, t.dtype) for t in wire]
        sent = (n - 1) * sum(t.nbytes for t in tensors) // n
        self.dp_bytes_sent += sent
        with self.tracer.span("data-parallel comm"), self._guard("data-parallel all-to-all", data=True):
            self._hold_link(sent)
            for out, tensor in zip(received, wire, strict=True):
                dist.all_to_all_single(out, tensor, group=self._data_group)
        return [place.incoming(t) for t in received]

    def all_reduce_pipeline(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place over the stages of this rank's pipeline."""
        if self._pipeline_group is not None:
            # in a group of two the error names the other rank before the heartbeats notice it
            # (a killed rank writes no exit); likewise below
            with self._guard("pipeline all-reduce", self.topo.only_other(self.topo.pipeline_ranks(self.topo.replica))):
                self._all_reduce(tensor, self._pipeline_group, self.pp_place)

    def all_reduce_ends(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place between the first and last stage of this pipeline."""
        if self._ends_group is not None:
            sent = tensor.nbytes  # two ranks: each sends its copy once; it crosses the pipeline's links
            self.bytes_sent += sent
            ends = self.topo.pipeline_ranks(self.topo.replica)
            with self._guard("tied-weight all-reduce", self.topo.only_other([ends[0], ends[-1]])):
                self._hold_link(sent)
                self._all_reduce(tensor, self._ends_group, self.pp_place)

    def barrier_pipeline(self) -> None:
        """Every stage of this pipeline is here (blocks the CPU under NCCL too)."""
        if self._pipeline_group is not None:
            with self._guard("pipeline barrier", self.topo.only_other(self.topo.pipeline_ranks(self.topo.replica))):
                dist.barrier(group=self._pipeline_group, device_ids=self._barrier_devices)

    def barrier_all(self) -> None:
        with self._guard("barrier"):
            dist.barrier()

    def clock_offset_us(self, now_us: Callable[[], float], rounds: int = 5) -> float:
        """Rank 0's clock minus ours, from the fastest of a few ping-pongs with rank 0
        (half the round trip is assumed each way). Rank 0 answers each peer in turn."""
        best_rtt, offset = float("inf"), 0.0
        with self._guard("clock synchronisation with rank 0", 0 if self.topo.rank else None):
            for peer in range(1, self.topo.world_size):
                for _ in range(rounds):
                    if self.topo.rank == 0:
                        dist.recv(torch.zeros(1, dtype=torch.float64), src=peer)
                        dist.send(torch.tensor([now_us()], dtype=torch.float64), dst=peer)
                    elif self.topo.rank == peer:
                        sent = now_us()
                        dist.send(torch.tensor([sent], dtype=torch.float64), dst=0)
                        theirs = torch.zeros(1, dtype=torch.float64)
                        dist.recv(theirs, src=0)
                        back = now_us()
                        if back - sent < best_rtt:
                            best_rtt, offset = back - sent, float(theirs) - (sent + back) / 2
        return offset

    def send_bytes(self, data: bytes, peer: int, what: str) -> None:
        """Send ``data`` to rank ``peer`` on the default group (files between checkpoint folders)."""
        if data:
            with self._guard(f"sending {what}", peer):
                dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), peer)

    def recv_bytes(self, size: int, peer: int, what: str) -> bytes:
        """Receive ``size`` bytes that rank ``peer`` sends with ``send_bytes``."""
        data = torch.empty(size, dtype=torch.uint8)
        if size:
            with self._guard(f"receiving {what}", peer):
                dist.recv(data, peer)
        return data.numpy().tobytes()

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's ``obj``, indexed by rank (pickled: use only for our own small dicts)."""
        gathered: list[object] = [None] * self.topo.world_size
        with self._guard("start-up exchange"):
            dist.all_gather_object(gathered, obj)
        return gathered

    def leave(self, reason: str) -> None:
        """Elastic runs: this rank's replica leaves on purpose (a preemption notice) while the
        others train on: no loss for its peers' heartbeats, a mark for the survivors' agreement,
        no final barrier (the survivors do not wait for it); ``close`` is then a no-op."""
        if self.heartbeat is not None:
            self.heartbeat.stop("done")
        self._close_lane()
        self._mark_left(reason)
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
            self._mark_left(error)
            return  # tearing down groups can wait on a frozen peer; the process is about to exit
        with self._guard("final barrier"):
            dist.barrier()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.elastic is not None and self.topo.rank == 0:  # every rank has passed the barrier
            self.elastic.store.set(FINISHED, "1")
