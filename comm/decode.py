"""Generation's traffic through a pipeline (generation/): each stage's hidden states to the next,
and the last stage's new token ids around to the first, each with a flag that says the
micro-batch is done. Every message is sent without waiting; its handle is waited for before the
same micro-batch's next message leaves, by which time the receiver has long taken it.

Decode messages are one token per row: they go uncompressed and in fp32 (``--pp-compress``
is for training's activations), so a generated token never depends on a codec's rounding.
Under an emulated link (``--link-latency-ms``, ``--link-bandwidth-mbps``) a message is delivered
that long after it left, the sender not held: many small messages in flight at once is how
decoding uses a link, and a real link's latency overlaps them (training's emulation holds each
send instead, comm.link).
``DecodeLinks`` is what the generation loop uses of it, which the tests' in-process links
provide as well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from comm.topology import Topology

if TYPE_CHECKING:
    from comm.process_group import Communicator

TOKEN_DTYPE = torch.int64


class Waitable(Protocol):
    def wait(self) -> object: ...


class DecodeLinks(Protocol):
    """What the generation loop asks of this rank's links (one pipeline of one replica)."""

    topo: Topology

    def post_recv_hidden(self, shape: tuple[int, ...]) -> Waitable: ...
    def send_hidden(self, hidden: torch.Tensor, done: bool) -> Waitable: ...
    def post_recv_tokens(self, rows: int) -> Waitable: ...
    def send_tokens(self, ids: torch.Tensor, done: bool) -> Waitable: ...


@dataclass
class DecodeRecv:
    """A posted receive: ``wait()`` gives (tensor on the compute device, done)."""

    comm: Communicator
    what: str
    peer: int
    works: list
    buffers: list[torch.Tensor]

    def wait(self) -> tuple[torch.Tensor, bool]:
        with self.comm.tracer.span("decode recv"), self.comm._guard(self.what, self.peer):
            for work in self.works:
                work.wait()
            tensor, header = (self.comm.pp_place.incoming(b) for b in self.buffers)
            done, arrives_ns = header.tolist()
            if arrives_ns:  # an emulated link: not here before it would have arrived
                time.sleep(max(0.0, (arrives_ns - time.time_ns()) / 1e9))
        return tensor, bool(done)


@dataclass
class DecodeSend:
    """A send in flight; its tensors stay alive until ``wait()``."""

    comm: Communicator
    what: str
    peer: int
    works: list
    wire: list[torch.Tensor] = field(default_factory=list)

    def wait(self) -> None:
        with self.comm._guard(self.what, self.peer):
            for work in self.works:
                work.wait()
        self.wire.clear()


class DecodePeers:
    """Generation's point-to-point traffic (a part of comm.process_group.Communicator: it uses
    the communicator's pipeline group, placement, guard and wire)."""

    _decode_link_free_ns = 0  # an emulated link: when the messages sent so far have left

    def _decode_send(self, what: str, peer: int, payload: torch.Tensor, done: bool) -> DecodeSend:
        """``payload`` and a header: the done flag and, on an emulated link, when it arrives."""
        nbytes = payload.nbytes + 2 * TOKEN_DTYPE.itemsize
        self.bytes_sent += nbytes  # counted here; the emulated link holds the receiver, not us
        arrives_ns = 0
        if self.link is not None:  # on the wire after the messages before it, then the latency
            bandwidth_mbps, latency_ms = self.link
            sent_ns = max(time.time_ns(), self._decode_link_free_ns)
            sent_ns += int(nbytes * 8 / (bandwidth_mbps * 1e6) * 1e9) if bandwidth_mbps else 0
            self._decode_link_free_ns = sent_ns
            arrives_ns = sent_ns + int(latency_ms * 1e6)
        header = torch.tensor([int(done), arrives_ns], dtype=TOKEN_DTYPE, device=payload.device)
        wire = self.pp_place.outgoing([payload, header])
        with self._guard(what, peer):
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer, group=self._pipeline_group) for t in wire])
        return DecodeSend(self, what, peer, works, wire)

    def _decode_recv(self, what: str, peer: int, shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> DecodeRecv:
        buffers = [self.pp_place.buffer(shape, dtype) for shape, dtype in shapes]
        with self._guard(what, peer):
            works = dist.batch_isend_irecv(
                [dist.P2POp(dist.irecv, b, peer, group=self._pipeline_group) for b in buffers]
            )
        return DecodeRecv(self, what, peer, works, buffers)

    def post_recv_hidden(self, shape: tuple[int, ...]) -> DecodeRecv:
        """The previous stage's fp32 hidden states of a micro-batch's newest tokens."""
        return self._decode_recv("receive of generation activations", self.topo.rank - 1,
                                 [(shape, torch.float32), ((2,), TOKEN_DTYPE)])  # fmt: skip

    def send_hidden(self, hidden: torch.Tensor, done: bool) -> DecodeSend:
        payload = hidden.detach().float().contiguous()
        return self._decode_send("send of generation activations", self.topo.rank + 1, payload, done)

    def _first_of_pipeline(self) -> int:
        return self.topo.rank_of(0, self.topo.replica)

    def _last_of_pipeline(self) -> int:
        return self.topo.rank_of(self.topo.pipeline_size - 1, self.topo.replica)

    def post_recv_tokens(self, rows: int) -> DecodeRecv:
        """The first stage: the token ids the last stage sampled for a micro-batch's rows."""
        return self._decode_recv("receive of sampled tokens", self._last_of_pipeline(),
                                 [((rows,), TOKEN_DTYPE), ((2,), TOKEN_DTYPE)])  # fmt: skip

    def send_tokens(self, ids: torch.Tensor, done: bool) -> DecodeSend:
        payload = ids.to(TOKEN_DTYPE).contiguous()
        return self._decode_send("send of sampled tokens", self._first_of_pipeline(), payload, done)
