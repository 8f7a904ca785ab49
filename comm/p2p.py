"""Pipeline point-to-point traffic: a stage's activations to the next stage and their gradients
back, posted early and waited for late so that moving a micro-batch overlaps computing another.

The helpers do nothing at the ends of the pipeline (the first stage receives no activations, the
last sends none), so one schedule loop serves every stage. Each pipeline's traffic runs on its
own process group, through the link's codecs (comm.compress); under CUDA compute over Gloo its
tensors go through pinned host buffers (comm.devices.Placement). ``Neighbours`` is what a
schedule (pipeline.schedule) uses of it, which the tests' loopback fakes provide as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from comm.compress import Codec
from comm.topology import Topology
from comm.trace import NullTracer, Tracer

if TYPE_CHECKING:
    from comm.process_group import Communicator

POSITION_DTYPE = torch.int32  # token positions on the wire (a sequence is far shorter than 2**31)


@dataclass(frozen=True)
class Message:
    """What crosses a pipeline link: an activation or its gradient (``tensor``, through the link's
    codec) and, sent exactly beside it where the step needs them: ``side``, fp32 values that
    travel both ways (a mixture of experts' router sums, modules.routing), and ``positions``,
    the tokens' position ids (micro, seq), forward only (examples packed apart, data.stream)."""

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


class Neighbours(Protocol):
    """What a pipeline schedule asks of this rank's links to the stages before and after it."""

    topo: Topology
    tracer: Tracer | NullTracer

    def post_recv_forward(self, expected: Expected) -> PendingRecv: ...
    def post_recv_backward(self, expected: Expected) -> PendingRecv: ...
    def recv_forward(self, expected: Expected) -> Message | None: ...
    def recv_backward(self, expected: Expected) -> Message | None: ...
    def send_forward(self, message: Message, wait: bool = True) -> None: ...
    def send_backward(self, message: Message | None, wait: bool = True) -> None: ...
    def send_forward_recv_backward(self, message: Message, expected: Expected) -> Message | None: ...
    def post_send_backward_recv_forward(self, message: Message | None, expected: Expected) -> PendingRecv: ...
    def flush(self) -> None: ...


class PipelinePeers:
    """The pipeline's point-to-point traffic (a part of comm.process_group.Communicator: it uses
    the communicator's pipeline group, codecs, placement, guard and wire)."""

    def _outgoing(self, message: Message, codec: Codec) -> list[torch.Tensor]:
        """``message`` as wire tensors where the pipeline's backend reads them, counted and
        (under link emulation) held to the link's rate. Encoding runs on the compute device."""
        wire = codec.encode(message.tensor.detach())
        if message.side is not None:
            wire.append(message.side.detach().float())
        if message.positions is not None:
            wire.append(message.positions.to(POSITION_DTYPE))
        self._on_wire(sum(w.nbytes for w in wire), data=False)
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
