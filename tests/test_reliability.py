"""Crashes, damaged checkpoints and lost peers: no lost work, no silent fresh start, no hang."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comm.topology import Topology
from modules import family_for, load_config
from pipeline.stage import Stage
from tests.helpers import OFFLINE_ENV, ROOT, assert_all_ok, free_port, launch, read_metrics
from trainer.checkpoint import CheckpointError, complete_steps, load_checkpoint

STEPS = 24


def run_args(shards: Path, tasks: str, ckpt: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "--model-name", str(shards), "--task-name", tasks, "--seq-length", "64", "--seed", "3",
        "--pipeline-group-size", "2", "--batch-size", "8", "--micro-batch-size", "2",
        "--lr", "1e-3", "--warmup-steps", "3", "--total-steps", str(steps),
        "--checkpoint-path", str(ckpt), "--checkpoint-steps", "4", *extra,
    ]  # fmt: skip


def start(args: list[str], world: int, logs: Path) -> list[subprocess.Popen]:
    port = free_port()
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        cmd = [sys.executable, str(ROOT / "dist_clm_train.py"), "--rank", str(rank),
               "--dist-url", f"tcp://127.0.0.1:{port}", *args]  # fmt: skip
        out = open(logs / f"started{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_for_rows(ckpt: Path, rows: int, procs: list[subprocess.Popen], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        metrics = ckpt / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        assert all(p.poll() is None for p in procs), "a rank stopped early"
        time.sleep(0.02)
    raise AssertionError(f"no {rows} metric rows within {limit}s")


def final_state(ckpt: Path) -> dict[str, torch.Tensor]:
    directory = ckpt / f"checkpoint_{STEPS}"
    return {f"{p.name}/{k}": v for p in sorted(directory.glob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert_all_ok(launch(run_args(tiny_shards, two_tasks, tmp / "ckpt", extra=("--keep-checkpoints", "2")), 2, tmp))
    return tmp / "ckpt"


def test_keep_checkpoints_prunes_old_ones(uninterrupted: Path) -> None:
    assert complete_steps(uninterrupted) == [STEPS - 4, STEPS]
    assert (uninterrupted / "latest").read_text().strip() == str(STEPS)


def test_sigkill_then_relaunch_equals_uninterrupted(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    args = run_args(tiny_shards, two_tasks, ckpt, extra=("--keep-checkpoints", "2"))
    procs = start(args, 2, tmp_path)
    wait_for_rows(ckpt, 10, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    rows = read_metrics(ckpt)
    assert len(rows) < STEPS, "the run finished before it was killed"
    killed_at = latest = int((ckpt / "latest").read_text())
    assert latest in complete_steps(ckpt)  # latest never names a half-written checkpoint

    assert_all_ok(launch(args, 2, tmp_path))  # the same command again
    after = {r["step"]: r["loss"] for r in read_metrics(ckpt)}  # rows after the resume win
    expected = {r["step"]: r["loss"] for r in read_metrics(uninterrupted)}
    assert after == expected  # bit for bit, including the steps redone after the resume
    ours, reference = final_state(ckpt), final_state(uninterrupted)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in reference), f"resumed from step {killed_at}"


def stage_for(shards: Path, layers: range, first: bool, last: bool) -> tuple[Stage, torch.optim.Optimizer]:
    config = load_config(shards)
    stage = Stage(family_for(config.model_type), config, layers, first, last)
    return stage, torch.optim.AdamW(stage.parameters())


def test_damaged_checkpoint_names_the_file_and_the_fallback(
    uninterrupted: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    ckpt = shutil.copytree(uninterrupted, tmp_path / "ckpt")
    damaged = ckpt / f"checkpoint_{STEPS}" / "layer_4.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # truncated
    stage, optimizer = stage_for(tiny_shards, range(3, 5), first=False, last=True)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt, stage, optimizer)
    assert str(damaged) in str(exc.value) and f"step {STEPS - 4}" in str(exc.value)

    # a stage that does not read the damaged file still loads; the manifest guards each file
    first, optimizer = stage_for(tiny_shards, range(0, 3), first=True, last=False)
    step, _ = load_checkpoint(ckpt, first, optimizer)
    assert step == STEPS

    (ckpt / f"checkpoint_{STEPS}" / "manifest_stage1.json").unlink()
    (ckpt / f"checkpoint_{STEPS}" / "manifest_stage0.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        load_checkpoint(ckpt, stage, optimizer)


def test_refuses_to_overwrite_checkpoints_without_resume(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    ckpt = shutil.copytree(uninterrupted, tmp_path / "ckpt")
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    args = run_args(tiny_shards, two_tasks, ckpt, extra=("--load-checkpoint", "false"))
    results = launch(args, 2, tmp_path)
    assert all(r.returncode == 1 for r in results)
    assert all("--load-checkpoint" in r.output and "nothing was overwritten" in r.output for r in results)
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.name != "metrics.jsonl"} == {
        p: t for p, t in before.items() if p.name != "metrics.jsonl"
    }


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_lost_peer_stops_the_others_naming_it(
    tiny_shards: Path, two_tasks: str, tmp_path: Path, how: signal.Signals
) -> None:
    ckpt = tmp_path / "ckpt"
    procs = start(run_args(tiny_shards, two_tasks, ckpt, steps=100000, extra=("--comm-timeout", "6")), 2, tmp_path)
    try:
        wait_for_rows(ckpt, 3, procs)
        procs[1].send_signal(how)
        lost_at = time.monotonic()
        code = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - lost_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    output = (tmp_path / "started0.log").read_text()
    assert code == 1, output[-2000:]
    assert "lost " + Topology(1, 2, 1).describe(1) in output, output[-2000:]
    assert elapsed < (5 if how == signal.SIGKILL else 6 + 10)  # a closed connection is noticed at once
