"""Ranks on two test hosts (network namespaces joined by a veth pair) bound to --net-interface."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import OFFLINE_ENV, ROOT, free_port

HOSTS = {"a": "192.0.2.1", "b": "192.0.2.2"}  # TEST-NET-1, only inside the namespaces made here


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts() -> Iterator[dict[str, str]]:
    """Namespaces ``<tag>a`` and ``<tag>b``, each with one end of a veth pair; names by host."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to make network namespaces")
    tag = f"pt{os.getpid() % 100000}"
    names = {h: f"{tag}{h}" for h in HOSTS}
    try:
        for name in names.values():
            ip("netns", "add", name)
        ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for host, name in names.items():
            ip("link", "set", f"{tag}v{host}", "netns", name)
            ip("-n", name, "addr", "add", f"{HOSTS[host]}/24", "dev", f"{tag}v{host}")
            ip("-n", name, "link", "set", f"{tag}v{host}", "up")
            ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {err.stderr.decode().strip()}")
    yield {host: name for host, name in names.items()} | {"tag": tag}
    for name in names.values():
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def start(namespace: str, rank: int, interface: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    cmd = ["ip", "netns", "exec", namespace, sys.executable, str(ROOT / "dist_clm_train.py"),
           "--rank", str(rank), "--net-interface", interface, *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_ranks_on_two_hosts_train_over_the_named_interface(
    two_hosts: dict[str, str], tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    tag = two_hosts["tag"]
    args = ["--model-name", str(tiny_shards), "--task-name", two_tasks, "--pipeline-group-size", "2",
            "--seq-length", "32", "--batch-size", "4", "--micro-batch-size", "2", "--total-steps", "3",
            "--checkpoint-path", str(tmp_path / "ckpt"), "--dist-url", f"tcp://{HOSTS['a']}:{free_port()}",
            "--comm-timeout", "60"]  # fmt: skip
    procs = [start(two_hosts[h], r, f"{tag}v{h}", args, tmp_path / f"rank{r}.log") for r, h in enumerate(HOSTS)]
    codes = [p.wait(timeout=180) for p in procs]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], logs
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "3"


def test_unknown_interface_is_named_with_the_choices(two_hosts: dict[str, str], tmp_path: Path) -> None:
    args = ["--model-name", "unused", "--task-name", str(ROOT / "example_scripts" / "data" / "tiny.jsonl"),
            "--dist-url", f"tcp://{HOSTS['a']}:{free_port()}"]  # fmt: skip
    proc = start(two_hosts["a"], 0, "eth7", args, tmp_path / "rank0.log")
    assert proc.wait(timeout=60) != 0
    out = (tmp_path / "rank0.log").read_text()
    assert "--net-interface 'eth7' does not exist" in out and f"{two_hosts['tag']}va" in out
