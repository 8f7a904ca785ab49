"""Control traffic on the default group: clock offsets for merged traces, files between checkpoint
folders, and small objects every rank gathers at start-up and checkpoint commits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


class Control:
    """The default group's traffic (a part of comm.process_group.Communicator: it uses the
    communicator's topology and guard)."""

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
        with self._guard("an exchange of control messages"):
            dist.all_gather_object(gathered, obj)
        return gathered
