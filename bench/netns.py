"""Two test hosts on this machine: network namespaces joined by a veth pair, optionally shaped.

    with two_hosts(rate_mbps=10) as hosts:      # needs root and iproute2
        hosts.run("a", [...])                    # argv run inside host a

Each host has one end of the veth (``<tag>va`` / ``<tag>vb``) with a TEST-NET-1 address that
exists only inside these namespaces; ``tc ... tbf`` holds each direction to ``rate_mbps``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ADDRESSES = {"a": "192.0.2.1", "b": "192.0.2.2"}


class NoNetHosts(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, or refused)."""


@dataclass(frozen=True)
class NetHosts:
    tag: str

    def namespace(self, host: str) -> str:
        return f"{self.tag}{host}"

    def interface(self, host: str) -> str:
        return f"{self.tag}v{host}"

    def address(self, host: str) -> str:
        return ADDRESSES[host]

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside ``host``."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def two_hosts(rate_mbps: float | None = None) -> Iterator[NetHosts]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        raise NoNetHosts("needs root and iproute2 to make network namespaces")
    hosts = NetHosts(f"nt{os.getpid() % 100000}")
    try:
        for host in ADDRESSES:
            _ip("netns", "add", hosts.namespace(host))
        _ip("link", "add", hosts.interface("a"), "type", "veth", "peer", "name", hosts.interface("b"))
        for host, address in ADDRESSES.items():
            ns, dev = hosts.namespace(host), hosts.interface(host)
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if rate_mbps:  # the kernel holds each direction to the rate (netem is not available)
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                "rate", f"{rate_mbps}mbit", "burst", "64kb", "latency", "400ms"],
                               check=True, capture_output=True)  # fmt: skip
    except subprocess.CalledProcessError as err:
        _remove(hosts)
        raise NoNetHosts(f"cannot make network namespaces: {err.stderr.decode().strip()}") from None
    try:
        yield hosts
    finally:
        _remove(hosts)


def _remove(hosts: NetHosts) -> None:
    for host in ADDRESSES:
        subprocess.run(["ip", "netns", "del", hosts.namespace(host)], capture_output=True)
