"""Joining the job: the rendezvous store, torchrun's restarts and the network interface.

The default process group made here is Gloo on the CPU whatever the training backend: it carries
control messages (start-up checks, clock sync, the final barrier), while NCCL, where chosen,
gets groups of its own (see ``Communicator``), so no NCCL communicator spans ranks that never
exchange tensors.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import torch.distributed as dist

from comm.topology import Topology


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (closed again before a rank binds it): for local launches."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def store_address(dist_url: str) -> tuple[str, int] | None:
    """Host and port of the rendezvous store behind ``dist_url`` (None for file://)."""
    if dist_url.startswith("tcp://"):
        parsed = urlparse(dist_url)
        return parsed.hostname, parsed.port
    if dist_url.startswith("env://"):
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return None


def restart_attempt(dist_url: str) -> str | None:
    """``attempt_<n>/`` under torchrun (which restarts failed jobs with one store), else None."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return f"attempt_{count}/" if dist_url == "env://" and count is not None else None


def bind_interface(name: str) -> None:
    """Make Gloo and NCCL open their sockets on interface ``name`` (CommConfig checked it exists)."""
    os.environ["GLOO_SOCKET_IFNAME"] = name
    os.environ["NCCL_SOCKET_IFNAME"] = name


def elastic_store(dist_url: str, rank: int, timeout_s: float) -> dist.TCPStore:
    """A client of the elastic run's store (``comm/store_host.py``). Rank 0 starts the host,
    detached so that it outlives rank 0, unless one already answers at ``dist_url``."""
    host, port = store_address(dist_url)  # a tcp:// address (RunConfig checks)
    if rank == 0:
        try:
            return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=1))
        except (RuntimeError, ValueError):  # nobody answers yet: this rank starts the host
            host_script = Path(__file__).with_name("store_host.py")
            subprocess.Popen(
                [sys.executable, str(host_script), "--port", str(port), "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise ConnectionError(
            f"rank {rank} could not reach the elastic run's store at {dist_url} within {timeout_s:g}s "
            f"({(str(err).strip().splitlines() or [type(err).__name__])[0]}); check that rank 0 was started "
            "and the address is reachable from every node"
        ) from None


def join_job(topo: Topology, dist_url: str, timeout_s: float, store: dist.Store | None = None,
             key_space: str = "") -> None:  # fmt: skip
    """Make the default (Gloo) process group; an unreachable master is a one-line error. With
    ``store`` (an elastic run) the group's keys live under ``key_space`` of that store."""
    timeout = timedelta(seconds=timeout_s)
    try:
        attempt = restart_attempt(dist_url)
        if store is not None:
            dist.init_process_group(
                backend="gloo", store=dist.PrefixStore(f"{key_space}pg/", store), world_size=topo.world_size,
                rank=topo.rank, timeout=timeout,
            )  # fmt: skip
        elif attempt is None:
            dist.init_process_group(
                backend="gloo", init_method=dist_url, world_size=topo.world_size, rank=topo.rank,
                timeout=timeout,
            )  # fmt: skip
        else:
            # torchrun keeps one store across restarts: a new attempt must not read the
            # addresses the failed one left there, so each attempt gets its own key space.
            host, port = store_address(dist_url)
            hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(
                host, port, topo.world_size, is_master=not hosted_by_agent and topo.rank == 0, timeout=timeout
            )
            dist.init_process_group(
                backend="gloo", store=dist.PrefixStore(attempt, store), world_size=topo.world_size,
                rank=topo.rank, timeout=timeout,
            )  # fmt: skip
    except (RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConnectionError(
            f"{topo.describe(topo.rank)} could not join the job at {dist_url} within {timeout_s:g}s "
            f"({first_line}); check that rank 0 is running, --dist-url is reachable from every node "
            f"and --world-size {topo.world_size} ranks were started"
        ) from None
