"""Bad input fails fast, on every rank, with one message that names the problem and the rank.

Real ranks as subprocesses; at most two at a time (the test machine has two cores).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import RankResult, free_port, launch

pytestmark = pytest.mark.ranks  # every test here starts rank processes


def base_args(shards: Path, tasks: str, ckpt: Path, pp: int, world: int, timeout: float = 60) -> list[str]:
    return [
        "--model-name", str(shards), "--task-name", tasks, "--seq-length", "16",
        "--pipeline-group-size", str(pp), "--data-group-size", "1", "--world-size", str(world),
        "--batch-size", "2", "--micro-batch-size", "1", "--total-steps", "2",
        "--checkpoint-path", str(ckpt), "--comm-timeout", str(timeout), "--use-cuda", "false",
    ]  # fmt: skip


def test_missing_shard_stops_every_rank_and_names_it(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    (shards / "layer_4.safetensors").unlink()  # stage 1 of pp=2 holds layers 3 and 4
    ckpt = tmp_path / "ckpt"
    started = time.monotonic()
    results = launch(base_args(shards, two_tasks, ckpt, pp=2, world=2), 2, tmp_path, timeout=90)
    elapsed = time.monotonic() - started
    assert [r.rank for r in results] == [0, 1]
    for r in results:
        assert r.returncode != 0, f"rank {r.rank} succeeded:\n{r.output[-2000:]}"
        assert "layer_4" in r.output, f"rank {r.rank}:\n{r.output[-2000:]}"
        assert "rank 1 (stage 1, replica 0)" in r.output, f"rank {r.rank}:\n{r.output[-2000:]}"
        assert "Traceback" not in r.output, f"rank {r.rank}:\n{r.output[-2000:]}"
    assert elapsed < 45  # nobody waited for the comm timeout (60 s)
    assert not (ckpt / "metrics.jsonl").exists()  # no step was taken
    assert not (ckpt / "latest").exists()


@dataclass
class Unreachable:
    url: str
    result: RankResult
    elapsed: float


@pytest.fixture(scope="module")
def unreachable(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> Unreachable:
    """Rank 1 of a world of 2 started alone: rank 0, the master, never listens (one launch, two tests)."""
    tmp = tmp_path_factory.mktemp("unreachable")
    url = f"tcp://127.0.0.1:{free_port()}"
    args = [*base_args(tiny_shards, two_tasks, tmp / "ckpt", pp=2, world=2, timeout=3), "--dist-url", url]
    started = time.monotonic()
    (result,) = launch(args, 2, tmp, timeout=60, ranks=[1])
    return Unreachable(url, result, time.monotonic() - started)


def test_unreachable_master_is_a_clear_error(unreachable: Unreachable) -> None:
    out = unreachable.result.output
    assert unreachable.result.returncode != 0, out[-2000:]
    errors = [line for line in out.splitlines() if "could not join" in line]
    assert len(errors) == 1, out[-3000:]
    assert unreachable.url in errors[0] and "rank 1 (stage 1, replica 0)" in errors[0]
    assert "Traceback" not in out, out[-2000:]
    # torch's store may retry once after a random back-off, so allow a few timeouts, not 60 s
    assert unreachable.elapsed < 40, f"took {unreachable.elapsed:.0f}s with --comm-timeout 3"


def test_unreachable_master_prints_no_cpp_stack_trace(unreachable: Unreachable) -> None:
    out = unreachable.result.output
    assert "frame #" not in out and "Exception raised from" not in out, out[:1500]


def test_flag_error_exits_before_any_process_group(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    # --comm-timeout 120: had rank 0 opened the store and waited for peers, this could not finish in time
    args = base_args(tiny_shards, two_tasks, tmp_path / "ckpt", pp=2, world=3, timeout=120)
    started = time.monotonic()
    (result,) = launch(args, 3, tmp_path, timeout=60, ranks=[0])
    elapsed = time.monotonic() - started
    assert result.returncode in (1, 2), result.output[-2000:]
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output[-2000:]
    assert "--world-size 3" in lines[0] and lines[0].startswith("dist_clm_train.py: error:")
    assert "could not join" not in result.output
    assert elapsed < 30


def test_more_stages_than_layers_fails_before_connecting(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    # pp=6 for the 5-layer model; only rank 0 runs, so connecting would wait for the 120 s timeout
    args = base_args(tiny_shards, two_tasks, tmp_path / "ckpt", pp=6, world=6, timeout=120)
    started = time.monotonic()
    (result,) = launch(args, 6, tmp_path, timeout=60, ranks=[0])
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.output[-2000:]
    assert "only 5 layers" in result.output, result.output[-2000:]
    assert "--pipeline-group-size 5" in result.output
    assert "could not join" not in result.output
    assert "Traceback" not in result.output, result.output[-2000:]
    assert elapsed < 30


def test_missing_ranks_are_named_while_the_others_wait(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    """Two ranks of three started: rank 0 says within seconds which rank has not joined (not
    silence until --comm-timeout), then the one-line timeout."""
    url = f"tcp://127.0.0.1:{free_port()}"
    args = [*base_args(tiny_shards, two_tasks, tmp_path / "ckpt", pp=3, world=3, timeout=12), "--dist-url", url]
    first, second = launch(args, 3, tmp_path, timeout=90, ranks=[0, 1])
    waiting = [line for line in first.output.splitlines() if "waiting for rank" in line]
    # rank 1, slow to import on a loaded machine, may still be missing at the first note
    assert (waiting and f"waiting for rank [2] of 3 to join at {url} (2 joined): start it" in waiting[-1]) or (
        "waiting for ranks [1, 2] of 3" in waiting[-1]
    ), first.output
    assert first.returncode != 0 and second.returncode != 0
    assert "could not join" in first.output and "Traceback" not in first.output


def test_a_port_in_use_is_one_line_at_once(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        args = [*base_args(tiny_shards, two_tasks, tmp_path / "ckpt", pp=2, world=2, timeout=60), "--dist-url", url]
        (result,) = launch(args, 2, tmp_path, timeout=50, ranks=[0])  # far less than --comm-timeout 60
    errors = [line for line in result.output.splitlines() if "cannot listen" in line]
    assert result.returncode != 0 and len(errors) == 1, result.output[-2000:]
    assert f"rank 0 cannot listen at {url}" in errors[0] and "give every rank a free port in --dist-url" in errors[0]
    assert "Traceback" not in result.output
