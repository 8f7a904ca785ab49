"""Ranks on two test hosts (network namespaces joined by a veth pair) bound to --net-interface."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.netns import NetHosts, NoNetHosts, two_hosts
from tests.helpers import OFFLINE_ENV, ROOT, free_port


@pytest.fixture
def hosts() -> Iterator[NetHosts]:
    try:
        with two_hosts() as made:
            yield made
    except NoNetHosts as err:
        pytest.skip(str(err))


def start(hosts: NetHosts, host: str, rank: int, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "dist_clm_train.py"), "--rank", str(rank), *args]
    return subprocess.Popen(
        hosts.command(host, argv), cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT
    )


def test_ranks_on_two_hosts_train_over_the_named_interface(
    hosts: NetHosts, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    args = ["--model-name", str(tiny_shards), "--task-name", two_tasks, "--pipeline-group-size", "2",
            "--seq-length", "32", "--batch-size", "4", "--micro-batch-size", "2", "--total-steps", "3",
            "--checkpoint-path", str(tmp_path / "ckpt"), "--dist-url", f"tcp://{hosts.address('a')}:{free_port()}",
            "--comm-timeout", "60"]  # fmt: skip
    procs = [start(hosts, h, r, [*args, "--net-interface", hosts.interface(h)], tmp_path / f"rank{r}.log")
             for r, h in enumerate("ab")]  # fmt: skip
    codes = [p.wait(timeout=180) for p in procs]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], logs
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "3"


def test_unknown_interface_is_named_with_the_choices(hosts: NetHosts, tmp_path: Path) -> None:
    args = ["--model-name", "unused", "--task-name", str(ROOT / "example_scripts" / "data" / "tiny.jsonl"),
            "--dist-url", f"tcp://{hosts.address('a')}:{free_port()}", "--net-interface", "eth7"]  # fmt: skip
    proc = start(hosts, "a", 0, args, tmp_path / "rank0.log")
    assert proc.wait(timeout=60) != 0
    out = (tmp_path / "rank0.log").read_text()
    assert "--net-interface 'eth7' does not exist" in out and hosts.interface("a") in out
