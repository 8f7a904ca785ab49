"""Collectives: sums and gathers over a stage's data-parallel replicas (gradients, ZeRO-1's shards,
compressed payloads, a joiner's state), over a pipeline's stages (the step's totals) and between
its two ends (a tied weight), with the barriers. Data-parallel collectives may run on the
communicator's own thread (``in_background``) while the backward goes on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from comm.devices import Placement
from comm.lane import Lane, Pending

# Values of each replica's slice a Gloo reduce-scatter or all-gather moves at once (64 MB of
# fp32): Gloo copies the whole buffer it is handed, so this bounds that copy; a few calls per
# step keep the latency paid per call small.
GLOO_CHUNK = 1 << 24


class Collectives:
    """Collectives over the data-parallel, pipeline and ends groups (a part of
    comm.process_group.Communicator: it uses the communicator's groups, placement, guard and wire)."""

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
            with self.tracer.span("data-parallel comm"), self._guard("data-parallel all-reduce", data=True):
                self._on_wire(sent, data=True)
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
        place = self.dp_place
        (wire,) = place.outgoing([tensor])
        received = output if not place.staged else place.buffer(output.shape, output.dtype)
        with self.tracer.span("data-parallel comm"), self._guard(what, data=True):
            self._on_wire(sent, data=True)
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
        with self.tracer.span("data-parallel comm"), self._guard("data-parallel all-gather", data=True):
            self._on_wire(sent, data=True)
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
        with self.tracer.span("data-parallel comm"), self._guard("data-parallel all-to-all", data=True):
            self._on_wire(sent, data=True)
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
            ends = self.topo.pipeline_ranks(self.topo.replica)
            with self._guard("tied-weight all-reduce", self.topo.only_other([ends[0], ends[-1]])):
                # two ranks: each sends its copy once; it crosses the pipeline's links
                self._on_wire(tensor.nbytes, data=False)
                self._all_reduce(tensor, self._ends_group, self.pp_place)

    def barrier_pipeline(self) -> None:
        """Every stage of this pipeline is here (blocks the CPU under NCCL too)."""
        if self._pipeline_group is not None:
            with self._guard("pipeline barrier", self.topo.only_other(self.topo.pipeline_ranks(self.topo.replica))):
                dist.barrier(group=self._pipeline_group, device_ids=self._barrier_devices)

    def barrier_all(self) -> None:
        with self._guard("barrier"):
            dist.barrier()

    def send_to_replica(self, replica: int, header: object, tensors: list[torch.Tensor]) -> None:
        """Send ``header`` (pickled: our own small dicts) and ``tensors`` to this stage's rank in
        ``replica``, over the data-parallel group (a live replica handing a joiner its state)."""
        peer = self.topo.rank_of(self.topo.stage, replica)
        with self.tracer.span("data-parallel comm"), self._guard("sending state to a joining replica", peer):
            self._on_wire(sum(t.nbytes for t in tensors), data=True)
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
