"""A preemption notice (SIGTERM; SIGUSR1 from SLURM's --signal) costs no work: every rank stops
at the same step boundary with a checkpoint of that step and exits 0; a relaunch goes on."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, assert_all_ok, assert_same_state, free_port, launch, read_metrics, start_ranks
from tests.pp2_dp2 import TOTAL, elastic_args, final_weights, signal_after_rows, training_rows, wait_all
from trainer.checkpoint import complete_steps


@pytest.mark.ranks
def test_sigterm_to_one_rank_stops_every_rank_at_a_committed_step_and_a_relaunch_goes_on_exactly(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """SIGTERM to rank 3 (stage 1 of replica 1) after step 5 of a pp=2 x dp=2 run."""
    ckpt = tmp_path / "ckpt"
    args = elastic_args(tiny_shards, two_tasks, ckpt)
    procs = start_ranks(args, range(4), tmp_path, free_port())
    signal_after_rows(procs, ckpt, 5, victim=3, how=signal.SIGTERM)
    codes = wait_all(procs, timeout=120)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(4)}
    assert codes == [0, 0, 0, 0], {rank: log[-1500:] for rank, log in logs.items()}

    stopped = max(training_rows(ckpt))
    assert 5 <= stopped < TOTAL
    (event,) = [r for r in read_metrics(ckpt) if r.get("event") == "preempted"]
    assert event["step"] == stopped and event["noticed_replicas"] == [1]
    # the step the run stopped at is committed and is the one a relaunch reads
    assert int((ckpt / "latest").read_text()) == stopped and stopped in complete_steps(ckpt)
    assert f"preempted (SIGTERM): step {stopped} committed to {ckpt}" in logs[3], logs[3][-2000:]
    assert f"a preemption notice reached replica 1: step {stopped} committed" in logs[0], logs[0][-2000:]
    assert "received SIGTERM" not in logs[0] + logs[1] + logs[2]  # the notice came to rank 3 alone

    assert_all_ok(launch(args, 4, tmp_path))  # the same command again
    # no step redone (training_rows refuses a step reported twice) and every loss bit for bit
    assert training_rows(ckpt) == training_rows(pp2_dp2_run)
    ours, reference = final_weights(ckpt), final_weights(pp2_dp2_run)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in reference)


# The notice's own rules, in a process of its own (they end processes): no process group needed.
NOTICE_SCRIPT = """
import os, signal, sys, time
from run.preemption import PreemptionNotice
notice = PreemptionNotice(grace_s=float(sys.argv[1]))
notice.install()
os.kill(os.getpid(), signal.SIGUSR1)
print("pending", notice.pending, notice.signal_name, flush=True)
if sys.argv[2] == "twice":
    os.kill(os.getpid(), signal.SIGTERM)
time.sleep(float(sys.argv[3]))
notice.uninstall()
print("stopped on its own", flush=True)
"""


def notice_process(grace: float, second: str, sleep: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", NOTICE_SCRIPT, str(grace), second, str(sleep)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_notice_is_held_until_the_run_stops_within_the_grace() -> None:
    done = notice_process(grace=30, second="once", sleep=0.5)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["pending True SIGUSR1", "stopped on its own"]
    assert "received SIGUSR1" in done.stderr


def test_a_second_signal_stops_at_once() -> None:
    done = notice_process(grace=30, second="twice", sleep=20)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr  # as a shell reports a SIGTERM death
    assert "stopped on its own" not in done.stdout
    assert "a second notice (SIGTERM) arrived before the run could stop" in done.stderr


def test_the_notice_running_out_stops_the_process_as_the_signal_would() -> None:
    done = notice_process(grace=0.5, second="once", sleep=20)
    assert done.returncode == 128 + signal.SIGUSR1, done.stderr
    assert "stopped on its own" not in done.stdout
    assert "the run did not stop within --preempt-grace 0.5s" in done.stderr


@pytest.mark.ranks
@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_with_elastic_only_the_noticed_replica_leaves_and_the_other_trains_on_to_the_same_losses(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path, sharded: bool
) -> None:
    """--elastic: SIGTERM to rank 2 (stage 0 of replica 1) after step 5. Replica 1 leaves cleanly
    (exit 0, nothing redone); replica 0 regroups alone and finishes with the whole global batch;
    every step's loss equals the uninterrupted run's. With --shard-optimizer the replicas commit
    that step first and the survivor loads it, its moments laid out for one replica: again
    nothing is redone."""
    ckpt = tmp_path / "ckpt"
    flags = ("--elastic", "--shard-optimizer") if sharded else ("--elastic",)
    procs = start_ranks(elastic_args(tiny_shards, two_tasks, ckpt, *flags), range(4), tmp_path, free_port())
    signal_after_rows(procs, ckpt, 5, victim=2, how=signal.SIGTERM)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(4)}
    assert codes == [0, 0, 0, 0], {rank: log[-1500:] for rank, log in logs.items()}
    assert "this replica leaves the elastic run after step" in logs[2] + logs[3]

    ours, expected = training_rows(ckpt), training_rows(pp2_dp2_run)
    assert sorted(ours) == list(range(1, TOTAL + 1))  # none lost, none redone
    assert [ours[s] for s in expected] == pytest.approx([expected[s] for s in expected], rel=1e-5)
    (event,) = [r for r in read_metrics(ckpt) if r.get("event") == "replicas left"]
    assert event["reason"] == "preempted" and event["left_launch_ranks"] == [2, 3] and event["replicas"] == 1
    before = [s for s in ours if s <= event["step"]]
    assert [ours[s] for s in before] == [expected[s] for s in before]  # bit for bit until it left
    assert int((ckpt / "latest").read_text()) == TOTAL
    assert_same_state(final_weights(ckpt), final_weights(pp2_dp2_run))  # to rounding (summed in another order)
