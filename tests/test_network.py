"""Ranks on two test hosts (network namespaces joined by a veth pair) bound to --net-interface."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.netns import NetHosts, NoNetHosts, two_hosts
from tests.helpers import OFFLINE_ENV, ROOT, free_port

pytestmark = pytest.mark.ranks  # every test here starts rank processes


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


def test_two_sites_with_a_folder_each_resume_by_fetching_from_each_other(
    hosts: NetHosts, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """pp=2 x dp=2 as two sites (replica 0 on host a, replica 1 on host b), each with its own
    checkpoint folder. Run 6 steps; then give site b an empty disk and site a only checkpoint 3:
    the relaunch fetches site b's files from site a and ends with the same bytes."""

    def run(root: Path, logs: Path) -> None:
        logs.mkdir(parents=True)
        url = f"tcp://{hosts.address('a')}:{free_port()}"
        procs = []
        for rank in range(4):
            site = "ab"[rank // 2]
            args = ["--model-name", str(tiny_shards), "--task-name", two_tasks, "--pipeline-group-size", "2",
                    "--data-group-size", "2", "--seq-length", "32", "--batch-size", "2", "--micro-batch-size", "1",
                    "--total-steps", "6", "--checkpoint-steps", "3", "--checkpoint-path", str(root / site),
                    "--dist-url", url, "--comm-timeout", "60", "--net-interface", hosts.interface(site)]  # fmt: skip
            procs.append(start(hosts, site, rank, args, logs / f"rank{rank}.log"))
        codes = [p.wait(timeout=300) for p in procs]
        assert codes == [0] * 4, [(logs / f"rank{r}.log").read_text()[-2000:] for r in range(4)]

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}

    first = tmp_path / "first"
    run(first, tmp_path / "logs1")
    assert files(first / "a" / "checkpoint_6") == files(first / "b" / "checkpoint_6")  # every stage at each site

    again = tmp_path / "again"
    (again / "b").mkdir(parents=True)  # a new node at site b
    shutil.copytree(first / "a" / "checkpoint_3", again / "a" / "checkpoint_3")
    (again / "a" / "latest").write_text("3\n")
    run(again, tmp_path / "logs2")
    assert "fetched" in (tmp_path / "logs2" / "rank2.log").read_text()
    for site in "ab":
        assert files(again / site / "checkpoint_6") == files(first / "a" / "checkpoint_6"), site
