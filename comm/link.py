"""What a rank puts on the wire: counted where it crosses, and held to an emulated link's rate.

Every send of the communicator (comm.process_group) goes through ``Wire._on_wire``: pipeline
bytes (activations, their gradients, a tied weight's sum between the pipeline's ends) count in
``bytes_sent``, data-parallel bytes (gradient sums, weight gathers, a joiner's state) in
``dp_bytes_sent``; under --link-bandwidth-mbps / --link-latency-ms the send is held as long as
that link would take, one latency per message or collective.
"""

from __future__ import annotations

import time


class Wire:
    """The communicator's byte counts and link emulation (a part of comm.process_group.Communicator)."""

    link: tuple[float, float] | None  # (bandwidth in Mbit/s, 0: unlimited; latency in ms), None: no emulation
    bytes_sent: int  # point-to-point bytes this rank put on the wire
    dp_bytes_sent: int  # and bytes of data-parallel collectives

    def _on_wire(self, nbytes: int, data: bool) -> None:
        """``nbytes`` leave this rank now: to other replicas (``data``) or along the pipeline."""
        if data:
            self.dp_bytes_sent += nbytes
        else:
            self.bytes_sent += nbytes
        if self.link is not None and nbytes:
            bandwidth_mbps, latency_ms = self.link
            time.sleep(latency_ms / 1e3 + (nbytes * 8 / (bandwidth_mbps * 1e6) if bandwidth_mbps else 0.0))
