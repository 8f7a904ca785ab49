"""--elastic: a lost rank's replica leaves and the other pipelines train on, no restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from comm.membership import Membership, all_done
from tests.helpers import (
    OFFLINE_ENV,
    ROOT,
    assert_all_ok,
    assert_same_state,
    free_port,
    launch,
    read_metrics,
    start_ranks,
    store_client,
)
from tests.pp2_dp2 import (
    TOTAL,
    elastic_args,
    evaluation_flags,
    events,
    final_weights,
    kill_after_rows,
    last_rows,
    training_rows,
    validation_rows,
    wait_all,
    wait_for_rows,
)


@pytest.mark.ranks
def test_killed_rank_s_replica_leaves_and_the_survivors_train_on_to_the_same_losses(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """SIGKILL rank 1 after step 5: it is replica 0's last stage (the metrics reporter) and the
    store's host was started by rank 0, which leaves with it. Replica 1 redoes the step it was in
    with the whole global batch and finishes; every step's loss equals the uninterrupted run's."""
    ckpt = tmp_path / "ckpt"
    procs = start_ranks(elastic_args(tiny_shards, two_tasks, ckpt, "--elastic"), range(4), tmp_path, free_port())
    kill_after_rows(procs, ckpt, 5, victim=1)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(4)}
    assert codes[1] == -signal.SIGKILL
    assert codes[0] == 1 and "lost rank 1" in logs[0], logs[0][-2000:]  # its replica is broken: it leaves
    assert codes[2] == 0 and codes[3] == 0, logs[2][-2000:] + logs[3][-2000:]

    ours, expected = training_rows(ckpt), training_rows(pp2_dp2_run)
    assert sorted(ours) == list(range(1, TOTAL + 1))
    assert [ours[s] for s in expected] == pytest.approx([expected[s] for s in expected], rel=1e-5)
    (event,) = [r for r in read_metrics(ckpt) if r.get("event") == "replicas left"]
    assert event["left_launch_ranks"] == [0, 1] and event["replicas"] == 1 and 5 < event["step"] < TOTAL
    before = [r for r in read_metrics(ckpt) if "loss" in r and r["step"] < event["step"]]
    assert [r["loss"] for r in before] == [expected[r["step"]] for r in before]  # bit for bit until the loss
    assert_same_state(final_weights(ckpt), final_weights(pp2_dp2_run))  # to rounding (summed in another order)


@pytest.mark.ranks
def test_fewer_replicas_than_min_replicas_stop_with_a_message(
    tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    args = elastic_args(tiny_shards, two_tasks, ckpt, "--elastic", "--min-replicas", "2")
    procs = start_ranks(args, range(4), tmp_path, free_port())
    kill_after_rows(procs, ckpt, 3, victim=3)
    codes = wait_all(procs)
    assert codes[3] == -signal.SIGKILL
    assert codes[:3] == [1, 1, 1]
    for rank in (0, 1):
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert "fewer than --min-replicas 2" in log and "launch ranks [2, 3] were lost" in log, log[-2000:]


@pytest.mark.ranks
def test_relaunched_replica_joins_the_live_run_and_all_replicas_end_identical(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Two sites with a checkpoint folder each; rank 1 is SIGKILLed after step 5 and its replica
    (launch ranks 0 and 1) is started again with the same command once step 10 is done: it asks
    to join, the live replica hands it weights, AdamW state and the data position, and the two
    train on as dp=2. Every step's loss equals the uninterrupted run's; both sites' final
    checkpoints are bit for bit the same. A link latency slows steps so the joiner starts in time."""
    sites = {0: tmp_path / "site0", 1: tmp_path / "site1"}
    args = [*elastic_args(tiny_shards, two_tasks, sites[0], "--elastic"), "--link-latency-ms", "50"]
    port = free_port()

    def folder(rank: int) -> list[str]:  # ranks 0, 1 at site 0; 2, 3 at site 1
        return ["--checkpoint-path", str(sites[rank // 2])]

    procs = start_ranks(args, range(4), tmp_path, port, folder)
    wait_for_rows(procs, 5, *sites.values())
    procs[1].send_signal(signal.SIGKILL)
    assert procs[1].wait(timeout=60) == -signal.SIGKILL and procs[0].wait(timeout=60) == 1
    wait_for_rows(procs[2:], 10, *sites.values())
    procs[:2] = start_ranks(args, [0, 1], tmp_path, port, folder)  # the same command again
    codes = wait_all(procs)
    logs = "".join((tmp_path / f"rank{r}.log").read_text()[-1500:] for r in range(4))
    assert codes == [0, 0, 0, 0], logs

    ours, expected = training_rows(*sites.values()), training_rows(pp2_dp2_run)
    assert sorted(ours) == list(range(1, TOTAL + 1))
    assert [ours[s] for s in expected] == pytest.approx([expected[s] for s in expected], rel=1e-5)
    left, joined = events(*sites.values())
    assert left["event"] == "replicas left" and left["left_launch_ranks"] == [0, 1] and left["replicas"] == 1
    assert joined["event"] == "replicas joined" and joined["joined_launch_ranks"] == [0, 1] and joined["replicas"] == 2
    assert 10 <= joined["step"] < TOTAL
    here, there = final_weights(sites[0]), final_weights(sites[1])
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)  # one model
    assert_same_state(here, final_weights(pp2_dp2_run))


def lose_replica_0_and_start_it_again(args: list[str], ckpt: Path, tmp_path: Path) -> None:
    """A run of a mode that goes through checkpoints: SIGKILL rank 1 after step 10 (replica 0
    breaks; the survivors roll back to checkpoint 8), start ranks 0 and 1 again once step 14 is
    done, and wait for every rank to end well. Steps are slowed by a 50 ms emulated latency."""
    args, port = [*args, "--link-latency-ms", "50"], free_port()
    procs = start_ranks(args, range(4), tmp_path, port)
    wait_for_rows(procs, 10, ckpt)
    procs[1].send_signal(signal.SIGKILL)
    assert procs[1].wait(timeout=60) == -signal.SIGKILL and procs[0].wait(timeout=60) == 1
    while max(last_rows(ckpt), default=0) < 14:  # rolled back to 8, then six more steps
        assert procs[2].poll() is None and procs[3].poll() is None, (tmp_path / "rank2.log").read_text()[-2000:]
        time.sleep(0.05)
    procs[:2] = start_ranks(args, [0, 1], tmp_path, port)
    assert wait_all(procs) == [0, 0, 0, 0], "".join((tmp_path / f"rank{r}.log").read_text()[-1500:] for r in range(4))


@pytest.mark.ranks
def test_with_a_sharded_optimizer_a_lost_and_rejoined_replica_go_through_checkpoints_to_the_same_losses(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """--shard-optimizer: each replica holds half of every stage's AdamW moments, so a lost
    replica's half is gone with it. Rank 1 is SIGKILLed after step 10: the survivors roll back
    in-process to checkpoint 8, its moments laid out for one replica, and train on. Ranks 0 and
    1 started again join at a step boundary where the live replica commits a checkpoint that
    every rank then loads, laid out for two. Each step's last row, and the final weights, equal
    the uninterrupted run's (all-reduce, moments whole) to rounding."""
    ckpt = tmp_path / "ckpt"
    lose_replica_0_and_start_it_again(elastic_args(tiny_shards, two_tasks, ckpt, "--elastic", "--shard-optimizer"),
                                      ckpt, tmp_path)  # fmt: skip

    ours, expected = last_rows(ckpt), training_rows(pp2_dp2_run)
    assert sorted(ours) == list(range(1, TOTAL + 1))
    assert [ours[s] for s in expected] == pytest.approx([expected[s] for s in expected], rel=1e-5)
    rows = {r["event"]: r for r in events(ckpt)}
    assert sorted(rows) == ["replicas joined", "replicas left", "rolled back"]
    left, back, joined = rows["replicas left"], rows["rolled back"], rows["replicas joined"]
    assert left["left_launch_ranks"] == [0, 1] and back["step"] == 8 and back["from_step"] == left["step"]
    assert joined["replicas"] == 2 and joined["step"] > 14
    assert_same_state(final_weights(ckpt), final_weights(pp2_dp2_run))


@pytest.mark.ranks
def test_with_a_sharded_optimizer_a_replica_lost_while_gathering_the_update_is_rolled_back(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """--shard-optimizer gathers the updated shards after the step: rank 3 dies just before its
    gather of step 10 (tests/dies_in.py), so stage 1's gather fails in replica 0 while stage 0's
    succeeds. Both of replica 0's stages learn it before step 11 (a flag summed along the
    pipeline), regroup and roll back to checkpoint 8. Every step's last row, and the final
    weights, equal the uninterrupted run's to rounding."""
    ckpt, port = tmp_path / "ckpt", free_port()
    args = elastic_args(tiny_shards, two_tasks, ckpt, "--elastic", "--shard-optimizer")
    procs = start_ranks(args, range(3), tmp_path, port)
    procs += start_ranks(
        args, [3], tmp_path, port, script=("tests/dies_in.py", "data_parallel.sharded:Sharded.after_update", "10")
    )
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(4)}
    assert codes == [0, 0, 1, -signal.SIGKILL], logs[0][-2000:] + logs[1][-2000:]
    assert "after the update; this pipeline regroups" in logs[1], logs[1][-2000:]

    ours, expected = last_rows(ckpt), training_rows(pp2_dp2_run)
    assert sorted(ours) == list(range(1, TOTAL + 1))
    assert [ours[s] for s in expected] == pytest.approx([expected[s] for s in expected], rel=1e-5)
    rows = {r["event"]: r for r in events(ckpt)}
    assert sorted(rows) == ["replicas left", "rolled back"]
    assert rows["replicas left"]["step"] == 10 and rows["rolled back"]["step"] == 8
    assert_same_state(final_weights(ckpt), final_weights(pp2_dp2_run))


STEPS_ALONE = {
    "diloco": ("--dp-mode", "diloco", "--sync-every", "4", "--diloco-fragments", "2", "--diloco-overlap-steps", "1"),
    "local": ("--dp-mode", "local", "--sync-every", "3"),  # checkpoint 8 and most join steps fall between syncs
}


@pytest.mark.ranks
@pytest.mark.parametrize("mode", sorted(STEPS_ALONE))
def test_with_replicas_stepping_alone_a_lost_and_rejoined_replica_train_on_as_resumes_at_each_replica_count(
    tiny_shards: Path, two_tasks: str, tmp_path: Path, mode: str
) -> None:
    """Streaming DiLoCo (two fragments, overlap) and local SGD: the replicas differ between
    syncs and each saves its own files, so no live replica can stand for a lost one. Rank 1 is
    SIGKILLed after step 10: the survivors roll back to checkpoint 8 and train on alone; ranks 0
    and 1 started again join through a checkpoint of the join step that every rank loads. The
    run is then two resumes in one process: from step 9 to the join its rows are those of a run
    resumed from checkpoint 8 with one replica (the same global batch), after the join those of
    a run resumed from the join's checkpoint with two."""
    flags, ckpt = STEPS_ALONE[mode], tmp_path / "ckpt"
    lose_replica_0_and_start_it_again(elastic_args(tiny_shards, two_tasks, ckpt, *flags, "--elastic"), ckpt, tmp_path)
    rows = {r["event"]: r for r in events(ckpt)}
    assert sorted(rows) == ["replicas joined", "replicas left", "rolled back"] and rows["rolled back"]["step"] == 8
    joined = rows["replicas joined"]["step"]
    ours = last_rows(ckpt)
    assert sorted(ours) == list(range(1, TOTAL + 1)) and 14 <= joined < TOTAL

    def resumed(step: int, name: str, world: int, *flags: str) -> dict[int, float]:
        """A run of ``world`` ranks resumed from a copy of this run's checkpoint ``step``, with ``flags``."""
        folder = tmp_path / name / "ckpt"
        shutil.copytree(ckpt / f"checkpoint_{step}", folder / f"checkpoint_{step}")
        (folder / "latest").write_text(f"{step}\n")
        assert_all_ok(launch([*elastic_args(tiny_shards, two_tasks, folder, *STEPS_ALONE[mode]), *flags], world,
                             tmp_path / name))  # fmt: skip
        return last_rows(folder)

    # one replica trains the two replicas' slots: the same sequences in the same order
    alone = resumed(8, "alone", 2, "--data-group-size", "1", "--world-size", "2", "--batch-size", "4")
    assert [ours[s] for s in range(9, joined + 1)] == pytest.approx([alone[s] for s in range(9, joined + 1)], rel=1e-5)
    together = resumed(joined, "together", 4)
    assert [ours[s] for s in range(joined + 1, TOTAL + 1)] == [together[s] for s in range(joined + 1, TOTAL + 1)]


@pytest.mark.ranks
def test_a_joiner_with_other_settings_is_refused_with_a_message(
    tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    args = [*elastic_args(tiny_shards, two_tasks, ckpt, "--elastic"), "--link-latency-ms", "50"]
    port = free_port()
    procs = start_ranks(args, range(4), tmp_path, port)
    try:
        kill_after_rows(procs, ckpt, 3, victim=3)
        assert procs[3].wait(timeout=60) == -signal.SIGKILL and procs[2].wait(timeout=60) == 1
        joiners = start_ranks([*args, "--weight-decay", "0.1"], [2, 3], tmp_path, port)
        codes = [p.wait(timeout=120) for p in joiners]
        assert procs[0].poll() is None and procs[1].poll() is None  # the live run goes on
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert codes == [1, 1]
    for rank in (2, 3):
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert f"refused rank {rank}: its settings differ from the live run's; start it with the same flags" in log


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data-group-size", "1", "--world-size", "2"], "--elastic needs --data-group-size 2 or more"),
        (["--min-replicas", "3"], "--min-replicas 3 must lie in 1..--data-group-size 2"),
    ],
)
def test_bad_elastic_settings_are_one_line_errors(
    tiny_shards: Path, two_tasks: str, tmp_path: Path, extra: list[str], message: str
) -> None:
    args = [sys.executable, str(ROOT / "dist_clm_train.py"), "--rank", "0",
            *elastic_args(tiny_shards, two_tasks, tmp_path / "ckpt", "--elastic"), *extra]  # fmt: skip
    result = subprocess.run(args, cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.ranks
def test_a_replica_lost_during_an_evaluation_is_evaluated_without_it(
    pp2_dp2_run: Path, pp2_dp2_evaluated_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """SIGKILL rank 3 as the run evaluates after step 35 (60 evaluation batches over a 20 ms
    emulated link make that last seconds): replica 0's stages agree that the evaluation's sum
    failed, regroup and evaluate again alone. Every evaluation row equals a run's that lost
    nothing (to 1e-5: summed in another order) and training ends with the same losses."""
    ckpt = tmp_path / "ckpt"
    args = elastic_args(tiny_shards, two_tasks, ckpt, "--elastic", *evaluation_flags(two_tasks))
    procs = start_ranks([*args, "--link-latency-ms", "20"], range(4), tmp_path, free_port())
    kill_after_rows(procs, ckpt, 35, victim=3)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(4)}
    assert codes[3] == -signal.SIGKILL and codes[:2] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "during the evaluation; this pipeline is whole" in logs[0] + logs[1], logs[1][-2000:]

    ours, expected = validation_rows(ckpt), validation_rows(pp2_dp2_evaluated_run)
    assert sorted(ours) == sorted(expected) == [35, 40]
    assert [ours[s] for s in expected] == pytest.approx([expected[s] for s in expected], rel=1e-5)
    (event,) = events(ckpt)
    assert event["event"] == "replicas left" and event["step"] == 35 and event["left_launch_ranks"] == [2, 3]
    trained, oracle = training_rows(ckpt), training_rows(pp2_dp2_run)
    assert sorted(trained) == list(range(1, TOTAL + 1))
    assert [trained[s] for s in oracle] == pytest.approx([oracle[s] for s in oracle], rel=1e-5)


def test_a_planned_regroup_waits_until_every_rank_is_done_with_the_generation(
    store: tuple[dist.TCPStore, int],
) -> None:
    """Before a join or a notice changes the generation, no rank may tear down its groups while a
    peer still reads its last collective: each waits in the store until all four ranks arrived
    (the last of them late); a rank that never comes is an error naming the generation."""
    main, port = store
    current, tag = Membership(3, (0, 1), 2), "growth after step 7"
    arrived: list[float] = []

    def rank(delay: float) -> None:
        time.sleep(delay)
        arrived.append(time.monotonic())
        all_done(store_client(port), current, tag, timeout_s=10)

    threads = [threading.Thread(target=rank, args=(delay,), daemon=True) for delay in (0.0, 0.0, 0.3)]
    for thread in threads:
        thread.start()
    all_done(main, current, tag, timeout_s=10)
    returned = time.monotonic()
    for thread in threads:
        thread.join(10)
    assert len(arrived) == 3 and returned >= max(arrived)
    with pytest.raises(ConnectionError, match="generation 4: not every rank reached the notice after step 9 within"):
        all_done(main, Membership(4, (0, 1), 2), "the notice after step 9", timeout_s=0.2)
