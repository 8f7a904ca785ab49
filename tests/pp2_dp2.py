"""A pp=2 x dp=2 run of the tiny model and what tests of lost, preempted and joining ranks read
from it; the uninterrupted run itself is the session fixture ``pp2_dp2_run`` (tests/conftest.py),
made once for every test that compares against it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import read_metrics, train_args

TOTAL = 40


def elastic_args(shards: Path, tasks: str, ckpt: Path, *extra: str) -> list[str]:
    # pp=2 x dp=2; a step's 8 sequences are 2 rounds of 2 per replica (4 slots of 2)
    return [*train_args(shards, tasks, ckpt, pp=2, dp=2, batch=2, micro=1, accum=2),
            "--total-steps", str(TOTAL), "--checkpoint-steps", "8", *extra]  # fmt: skip


def evaluation_flags(tasks: str) -> tuple[str, ...]:
    """An evaluation after steps 35 and 40 of the first task, 60 batches: over a 20 ms emulated
    link it lasts seconds, time enough to lose a rank in it."""
    first_task = tasks.split(",")[0].rsplit(":", 1)[0]
    return ("--evaluation-data", first_task, "--evaluation-steps", "35", "--evaluation-num-batch", "60")


def validation_rows(ckpt: Path) -> dict[int, float]:
    return {r["step"]: r["valid.loss"] for r in read_metrics(ckpt) if "valid.loss" in r}


def training_rows(*folders: Path) -> dict[int, float]:
    rows = [r for f in folders if (f / "metrics.jsonl").exists() for r in read_metrics(f) if "loss" in r]
    assert len({r["step"] for r in rows}) == len(rows), "a step was reported twice"
    return {r["step"]: r["loss"] for r in rows}


def last_rows(ckpt: Path) -> dict[int, float]:
    """Each step's loss by its last row: a run that rolled back to a checkpoint wrote the steps
    after it again (its "rolled back" row lies between)."""
    return {r["step"]: r["loss"] for r in read_metrics(ckpt) if "loss" in r}


def events(*folders: Path) -> list[dict]:
    rows = [r for f in folders if (f / "metrics.jsonl").exists() for r in read_metrics(f) if "event" in r]
    return sorted(rows, key=lambda r: r["step"])


def final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    folder = ckpt / f"checkpoint_{TOTAL}"
    return {f"{p.name}/{k}": v for p in sorted(folder.glob("layer_*.safetensors")) for k, v in load_file(p).items()}


def checkpoint_tensors(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint ``step``: weights, optimizer state, anything else saved."""
    folder = ckpt / f"checkpoint_{step}"
    return {f"{p.name}/{k}": v for p in sorted(folder.glob("*.safetensors")) for k, v in load_file(p).items()}


def wait_for_rows(procs: list[subprocess.Popen], rows: int, *folders: Path) -> None:
    deadline = time.monotonic() + 240
    while len(training_rows(*folders)) < rows:
        assert time.monotonic() < deadline, f"the run did not reach step {rows}"
        assert any(p.poll() is None for p in procs), "every rank stopped"
        time.sleep(0.02)


def signal_after_rows(procs: list[subprocess.Popen], ckpt: Path, rows: int, victim: int, how: int) -> None:
    wait_for_rows(procs, rows, ckpt)
    assert all(p.poll() is None for p in procs), "a rank stopped before the signal"
    procs[victim].send_signal(how)


def kill_after_rows(procs: list[subprocess.Popen], ckpt: Path, rows: int, victim: int) -> None:
    signal_after_rows(procs, ckpt, rows, victim, signal.SIGKILL)


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
