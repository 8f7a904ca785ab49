"""n data-parallel replicas as n threads of one process: the data-parallel part of
comm.process_group.Communicator without a process group, for unit tests of data_parallel/.

Every collective sums or gathers in replica order, so every replica gets the same values bit
for bit; each replica counts in ``dp_bytes_sent`` the bytes it puts into a collective (what it
sends), whatever the replica count. Replicas that call different collectives, or the same one
on different shapes, fail at once instead of pairing wrongly; a barrier that waits too long
fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import TypeVar

import torch

T = TypeVar("T")
TIMEOUT_S = 20.0  # a barrier a replica waits at longer than this is a bug (a missing or extra collective)


class CollectiveMismatch(AssertionError):
    """The replicas called different collectives (or on different shapes) at the same point."""


class ReplicaGroup:
    """What the replicas of one group share: a barrier and a slot per replica."""

    def __init__(self, n: int, timeout: float = TIMEOUT_S) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=timeout)
        self.slots: list[tuple[object, object] | None] = [None] * n
        self.calls = [0] * n  # collectives each replica called on this group

    def exchange(self, replica: int, what: object, value: object) -> list[object]:
        """Every replica's ``value``, in replica order; ``what`` (the collective and its shapes)
        must be the same on every replica."""
        self.calls[replica] += 1
        self.slots[replica] = (what, value)
        self.barrier.wait()
        slots = list(self.slots)
        self.barrier.wait()  # every replica has read the slots: the next collective may fill them
        kinds = [slot[0] for slot in slots]
        if any(kind != kinds[0] for kind in kinds):
            raise CollectiveMismatch(f"replica {replica}: the replicas called {kinds}")
        return [slot[1] for slot in slots]

    def abort(self) -> None:
        """Wake every replica waiting here with BrokenBarrierError (another one failed)."""
        self.barrier.abort()


class Done:
    """A job run at once, as comm.lane.Pending: ``wait()`` returns its result or raises its error."""

    def __init__(self, job: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        try:
            self.result = job()
        except Exception as err:  # noqa: BLE001 - raised again by wait(), as the lane does
            self.error = err

    def wait(self) -> object:
        if self.error is not None:
            raise self.error
        return self.result


class NullTracer:
    @contextmanager
    def span(self, *names: str) -> Iterator[None]:
        yield


def _summed(values: list[torch.Tensor]) -> torch.Tensor:
    """The values added up in replica order (the same bits on every replica)."""
    total = values[0].clone()
    for value in values[1:]:
        total += value
    return total


def _shape(t: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(t.shape), t.dtype


class ReplicaComm:
    """One replica's data-parallel communicator (the methods data_parallel/ calls)."""

    def __init__(self, group: ReplicaGroup, replica: int, side: ReplicaGroup | None = None) -> None:
        self.group, self.side = group, side
        self.replica = replica
        self.topo = SimpleNamespace(data_size=group.n, replica=replica, rank=replica)
        self.dp_bytes_sent = 0
        self.tracer = NullTracer()

    def _exchange(self, what: object, value: object, nbytes: int) -> list[object]:
        self.dp_bytes_sent += nbytes
        return self.group.exchange(self.replica, what, value)

    def all_reduce_data(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place over the replicas."""
        values = self._exchange(("all_reduce", _shape(tensor)), tensor.detach().clone(), tensor.nbytes)
        tensor.detach().copy_(_summed(values))

    def all_gather_data(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every replica's ``tensors``, by replica."""
        mine = [t.detach().clone() for t in tensors]
        nbytes = sum(t.nbytes for t in tensors)
        gathered = self._exchange(("all_gather", [_shape(t) for t in tensors]), mine, nbytes)
        return [[t.clone() for t in replica] for replica in gathered]

    def all_to_all_data(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor's i-th of ``data_size`` slices along dim 0 goes to replica i; per tensor,
        the slices every replica sent this one, in replica order along dim 0."""
        n = self.group.n
        for t in tensors:
            if t.shape[0] % n:
                raise ValueError(f"all_to_all_data: dim 0 of {tuple(t.shape)} does not split into {n} slices")
        mine = [t.detach().clone() for t in tensors]
        nbytes = sum(t.nbytes for t in tensors)
        sent = self._exchange(("all_to_all", [_shape(t) for t in tensors]), mine, nbytes)
        received = []
        for j, t in enumerate(tensors):
            size = t.shape[0] // n
            received.append(
                torch.cat([replica[j][self.replica * size : (self.replica + 1) * size] for replica in sent])
            )
        return received

    def reduce_scatter_data(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        """``output`` gets slice ``replica`` (of ``output``'s length) of the replicas' sum of
        ``tensor``; ``output`` may be that slice of ``tensor`` itself."""
        size = output.numel()
        if tensor.numel() != size * self.group.n:
            raise ValueError(f"reduce_scatter_data: {tensor.numel()} values do not make {self.group.n} x {size}")
        values = self._exchange(("reduce_scatter", _shape(tensor), size), tensor.detach().clone(), tensor.nbytes)
        chunk = slice(self.replica * size, (self.replica + 1) * size)
        output.detach().copy_(_summed([v.reshape(-1)[chunk] for v in values]).view_as(output))

    def all_gather_data_into(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        """Every replica's ``tensor`` end to end in replica order, into ``output`` (``tensor`` may be
        this replica's slice of ``output``)."""
        if output.numel() != tensor.numel() * self.group.n:
            raise ValueError(f"all_gather_data_into: {output.numel()} values are not {self.group.n} x {tensor.numel()}")
        values = self._exchange(("all_gather_into", _shape(tensor)), tensor.detach().clone(), tensor.nbytes)
        output.detach().copy_(torch.cat([v.reshape(-1) for v in values]).view_as(output))

    def in_background(self, job: Callable[[], object]) -> Done:
        return Done(job)

    def scratch_bytes(self, size: int, itemsize: int) -> int:
        return 0

    def side_channel(self) -> ReplicaComm:
        """The same replicas on a second group (a barrier and slots of its own), counting its own bytes."""
        if self.side is None:
            raise RuntimeError("this communicator has no side group")
        return ReplicaComm(self.side, self.replica)


def run_replicas(n: int, fn: Callable[[ReplicaComm], T], timeout: float = TIMEOUT_S) -> list[T]:
    """``fn(comm)`` on n threads, one per replica; their results in replica order. A replica's
    error is raised here (the first that is not another replica's broken barrier)."""
    group, side = ReplicaGroup(n, timeout), ReplicaGroup(n, timeout)
    results: list[object] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def work(replica: int) -> None:
        try:
            results[replica] = fn(ReplicaComm(group, replica, side))
        except BaseException as err:  # noqa: BLE001 - raised again in the calling thread
            errors[replica] = err
            group.abort()  # the others stop waiting for this one
            side.abort()

    threads = [threading.Thread(target=work, args=(r,), name=f"replica {r}", daemon=True) for r in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * 3)
    if any(thread.is_alive() for thread in threads):
        group.abort()
        side.abort()
        raise TimeoutError(f"a replica did not finish within {timeout * 3:g} s")
    failed = [err for err in errors if err is not None]
    if failed:
        first = next((err for err in failed if not isinstance(err, threading.BrokenBarrierError)), failed[0])
        raise first
    return results  # type: ignore[return-value]
