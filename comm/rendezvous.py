"""Joining the job: the rendezvous store, torchrun's restarts and the network interface.

The default process group made here is Gloo on the CPU whatever the training backend: it carries
control messages (start-up checks, clock sync, the final barrier), while NCCL, where chosen,
gets groups of its own (see ``Communicator``), so no NCCL communicator spans ranks that never
exchange tensors.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import torch.distributed as dist

from comm.admission import (
    LIVE,
    NOTE_AFTER_S,
    NOTE_EVERY_S,
    Card,
    Doorkeeper,
    ask_to_enter,
    exposure,
    open_run,
    read_card,
    refuse_if_live,
)
from comm.topology import Topology

log = logging.getLogger(__name__)


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
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ValueError(
                f"--dist-url env:// reads {' and '.join(missing)} from the environment, where it is not set; set it "
                "(torchrun and example_scripts/slurm.sbatch do), or give tcp://<host>:<port>"
            )
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


_JOINED = "joined/"  # rank r sets joined/<r> as soon as it reaches the launch's store


def _launch_store(topo: Topology, dist_url: str, timeout_s: float) -> dist.TCPStore:
    """The launch's store at ``dist_url``: rank 0 listens (a port in use is a one-line error at
    once, naming the run there if it is one); the others connect, saying while rank 0 does not
    answer."""
    host, port = store_address(dist_url)
    if port is None:
        raise ValueError(f"--dist-url {dist_url} names no port; give tcp://<rank-0 address>:<port>")
    # under torchrun the agent may host the store at this address already
    hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if topo.rank == 0 and not hosted:
        try:
            return dist.TCPStore(host, port, topo.world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                                 wait_for_workers=False)  # fmt: skip
        except (RuntimeError, OSError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _refuse_if_a_run_is_there(host, port, dist_url)
            raise ConnectionError(
                f"rank 0 cannot listen at {dist_url} ({reason}): is another run (or another rank 0) using port "
                f"{port}? give every rank a free port in --dist-url"
            ) from None
    store = _connect(topo, dist_url, host, port, timeout_s)
    # connected in short attempts; from now on its waits (NCCL's id exchange among them) take the full timeout
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


def _refuse_if_a_run_is_there(host: str, port: int, dist_url: str) -> None:
    """Rank 0 finding its port taken: if a run's store answers there, say which run it is. The
    look runs on a thread of its own, bounded: a program that takes the connection but is no
    store may never answer (the caller's message then says the port is in use)."""
    found: list[tuple[Card | None, bool]] = []

    def look() -> None:
        try:
            other = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=2))
            card = read_card(other)
            found.append((card, card is not None and other.check([LIVE])))
        except (RuntimeError, ValueError, OSError):
            return  # no store there: some other program holds the port

    looking = threading.Thread(target=look, name="port-owner", daemon=True)
    looking.start()
    looking.join(timeout=3.0)
    if found and found[0][0] is not None:
        card, live = found[0]
        raise ConnectionError(
            f"rank 0: another run is {'training' if live else 'gathering its ranks'} at {dist_url} "
            f"({card.describe()}); give this run a port of its own in --dist-url"
        )


def _connect(topo: Topology, dist_url: str, host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of rank 0's store, retried in short attempts so a long wait is said, not silent."""
    started = time.monotonic()
    noted = started + NOTE_AFTER_S
    while True:
        left = timeout_s - (time.monotonic() - started)
        try:
            return dist.TCPStore(host, port, topo.world_size, is_master=False,
                                 timeout=timedelta(seconds=max(0.1, min(NOTE_AFTER_S, left))))  # fmt: skip
        except (RuntimeError, ValueError) as err:
            if time.monotonic() - started >= timeout_s:
                raise RuntimeError(str(err)) from None  # join_job turns it into its one-line error
        if time.monotonic() >= noted:
            log.warning(
                "%s: waiting for rank 0 at %s (no answer for %.0fs; --comm-timeout %gs): start rank 0 there, "
                "or check the address and that its port is open", topo.describe(topo.rank), dist_url,
                time.monotonic() - started, timeout_s,
            )  # fmt: skip
            noted = time.monotonic() + NOTE_EVERY_S


@contextmanager
def _saying_who_is_missing(topo: Topology, dist_url: str, prefix: str) -> Iterator[None]:
    """While the process group forms, rank 0 names the ranks that have not reached the store
    yet, after NOTE_AFTER_S and then every NOTE_EVERY_S (the group's own wait is silent). It
    looks through a client of its own: a store client does one operation at a time, and the
    group's wait holds rank 0's until everyone is in."""
    if topo.rank != 0:
        yield
        return
    done = threading.Event()
    host, port = store_address(dist_url)

    def watch() -> None:
        if done.wait(NOTE_AFTER_S):
            return
        try:
            store = dist.TCPStore(host, port, topo.world_size, is_master=False, timeout=timedelta(seconds=NOTE_AFTER_S))
            store = dist.PrefixStore(prefix, store) if prefix else store
            while not done.is_set():
                missing = [r for r in range(topo.world_size) if not store.check([f"{_JOINED}{r}"])]
                if not missing:
                    return
                _say_missing(missing)
                done.wait(NOTE_EVERY_S)
        except (RuntimeError, OSError):  # the notes are a courtesy: the group's own wait decides
            return

    def _say_missing(missing: list[int]) -> None:
        many = len(missing) > 1
        log.warning(
            "waiting for rank%s %s of %d to join at %s (%d joined): start %s, or check --world-size",
            "s" if many else "", missing, topo.world_size, dist_url, topo.world_size - len(missing),
            "them" if many else "it",
        )  # fmt: skip

    watcher = threading.Thread(target=watch, name="rendezvous-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=1.0)


def join_job(topo: Topology, dist_url: str, timeout_s: float, store: dist.Store | None = None,
             key_space: str = "", token: str | None = None, admit: bool = True) -> None:  # fmt: skip
    """Make the default (Gloo) process group; an unreachable master is a one-line error. With
    ``store`` (an elastic run) the group's keys live under ``key_space`` of that store. With
    ``admit``, ranks pass rank 0's door first (comm.admission: a run already training there is
    refused, and with ``token`` each rank proves it knows the run token); an elastic run's
    regroups, among ranks already in, skip it."""
    timeout = timedelta(seconds=timeout_s)
    address = store_address(dist_url)
    warning = exposure(address[0], token) if admit and topo.rank == 0 and address else None
    if warning:
        log.warning("%s", warning)
    try:
        if store is not None:
            space = dist.PrefixStore(key_space, store)
            with _admission(topo, space, dist_url, timeout_s, token, admit, key_space):
                dist.init_process_group(backend="gloo", store=dist.PrefixStore("pg/", space),
                                        world_size=topo.world_size, rank=topo.rank, timeout=timeout)  # fmt: skip
        elif dist_url.startswith(("tcp://", "env://")):
            # torchrun keeps one store across restarts: a new attempt must not read the keys the
            # failed one left there, so each attempt gets its own key space
            attempt = restart_attempt(dist_url) or ""
            space = _launch_store(topo, dist_url, timeout_s)
            space = dist.PrefixStore(attempt, space) if attempt else space
            with _admission(topo, space, dist_url, timeout_s, token, admit, attempt):
                space.set(f"{_JOINED}{topo.rank}", socket.gethostname())
                with _saying_who_is_missing(topo, dist_url, attempt):
                    dist.init_process_group(backend="gloo", store=dist.PrefixStore("pg/", space),
                                            world_size=topo.world_size, rank=topo.rank, timeout=timeout)  # fmt: skip
        else:  # file://: a shared file system's rendezvous, no store to keep a door at
            dist.init_process_group(backend="gloo", init_method=dist_url, world_size=topo.world_size,
                                    rank=topo.rank, timeout=timeout)  # fmt: skip
    except (RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConnectionError(
            f"{topo.describe(topo.rank)} could not join the job at {dist_url} within {timeout_s:g}s "
            f"({first_line}); check that rank 0 is running, --dist-url is reachable from every node "
            f"and --world-size {topo.world_size} ranks were started"
        ) from None


@contextmanager
def _admission(topo: Topology, space: dist.Store, dist_url: str, timeout_s: float, token: str | None,
               admit: bool, prefix: str) -> Iterator[None]:  # fmt: skip
    """Around the making of the process group: rank 0 opens the run (its card, and with a token
    a doorkeeper answering the others' proofs) and marks it live once the group stands; every
    other rank enters first (comm.admission)."""
    if not admit:
        yield
        return
    if topo.rank != 0:
        ask_to_enter(space, topo.rank, token, dist_url, timeout_s)
        yield
        return
    refuse_if_live(space, dist_url, "rank 0")  # an elastic store left by a run that still trains
    card = open_run(space, topo.world_size, token)
    door = None
    if token is not None:
        host, port = store_address(dist_url)
        door = Doorkeeper(host, port, prefix, card, token, timeout_s)
    try:
        yield
    finally:
        if door is not None:
            door.stop()
    space.set(LIVE, "1")
