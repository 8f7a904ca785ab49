"""--spares: a standby process takes a lost rank's place (same stage, same replica) and the run
goes on with every replica, no restart. Multi-rank runs show each path (a hand-over after a loss
in a step, an evaluation or a commit; the roll-back with one replica, ZeRO-1 or DiLoCo); the
agreement itself is tested with a real store and no process group."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from comm.membership import Membership, mark_left, mark_lost, next_membership, publish, wait_as_spare
from comm.spares import SparePool
from comm.store_host import FINISHED
from comm.topology import Topology
from tests.helpers import (
    assert_all_ok,
    assert_same_state,
    free_port,
    launch,
    read_metrics,
    start_ranks,
    store_client,
    train_args,
)
from tests.pp2_dp2 import (
    TOTAL,
    checkpoint_tensors,
    elastic_args,
    evaluation_flags,
    events,
    final_weights,
    kill_after_rows,
    last_rows,
    signal_after_rows,
    training_rows,
    validation_rows,
    wait_all,
    wait_for_rows,
)
from trainer.checkpoint import complete_steps
from trainer.config import RunConfig


@pytest.mark.ranks
def test_a_spare_takes_a_killed_rank_s_place_and_every_loss_stays_the_uninterrupted_run_s(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """pp=2 x dp=2 with one spare (launch rank 4), without --elastic: SIGKILL rank 3 (stage 1 of
    replica 1) after step 5. Rank 2, its pipeline's other stage, stays; the spare becomes stage
    1 of replica 1 with replica 0's stage-1 weights, AdamW moments and data position, and the
    interrupted step is done again: two replicas throughout, every loss and the final weights
    those of the uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    procs = start_ranks(elastic_args(tiny_shards, two_tasks, ckpt, "--spares", "1"), range(5), tmp_path, free_port())
    kill_after_rows(procs, ckpt, 5, victim=3)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(5)}
    assert codes == [0, 0, 0, -signal.SIGKILL, 0], "".join(logs[r][-1500:] for r in (0, 1, 2, 4))
    assert "lost rank 3 (stage 1, replica 1)" in logs[2] and "; this rank regroups with the other" in logs[2], logs[2][
        -2000:
    ]
    assert "spare rank 4 took the place of launch rank 3 (stage 1 of launch replica 1)" in logs[4], logs[4][-2000:]

    ours, expected = training_rows(ckpt), training_rows(pp2_dp2_run)
    assert sorted(ours) == list(range(1, TOTAL + 1))
    # the same two replicas summing the same gradients in the same order: equal, not merely close
    assert [ours[s] for s in expected] == [expected[s] for s in expected]
    (event,) = events(ckpt)
    assert event["event"] == "spare took over" and (event["lost_launch_rank"], event["spare_launch_rank"]) == (3, 4)
    assert (event["stage"], event["launch_replica"], event["replicas"]) == (1, 1, 2) and 5 < event["step"] < TOTAL
    assert event["takeover_s"] > 0
    here, there = final_weights(ckpt), final_weights(pp2_dp2_run)
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)


@pytest.mark.ranks
def test_a_reporter_lost_during_an_evaluation_is_replaced_and_the_evaluation_done_again(
    pp2_dp2_run: Path, pp2_dp2_evaluated_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """SIGKILL rank 1 (replica 0's last stage, which writes the metrics) as the run evaluates
    after step 35 (slowed by a 20 ms emulated link): the spare takes its place at that step
    boundary, evaluates again with the others, and from then on writes the metrics and stage
    1's checkpoints. The evaluation and training rows and the final weights equal those of a
    run that lost nothing."""
    ckpt = tmp_path / "ckpt"
    args = elastic_args(tiny_shards, two_tasks, ckpt, "--spares", "1", *evaluation_flags(two_tasks))
    procs = start_ranks([*args, "--link-latency-ms", "20"], range(5), tmp_path, free_port())
    kill_after_rows(procs, ckpt, 35, victim=1)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(5)}
    assert codes == [0, -signal.SIGKILL, 0, 0, 0], "".join(logs[r][-1500:] for r in (0, 2, 3, 4))

    assert validation_rows(ckpt) == validation_rows(pp2_dp2_evaluated_run)
    (event,) = events(ckpt)
    assert (event["event"], event["step"], event["lost_launch_rank"], event["spare_launch_rank"]) == (
        "spare took over", 35, 1, 4)  # fmt: skip
    trained, oracle = training_rows(ckpt), training_rows(pp2_dp2_run)
    assert trained == oracle
    here, there = final_weights(ckpt), final_weights(pp2_dp2_run)
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)


@pytest.mark.ranks
def test_a_rank_lost_during_a_checkpoint_commit_is_replaced_and_the_commit_done_again(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Rank 3 dies as the commit of checkpoint 16 begins (tests/dies_in.py): the
    survivors' gathers fail before any of them moves ``latest``, which still names step 8 while
    they regroup; the spare takes rank 3's place with rank 1's state and commits step 16 with
    them. Checkpoint 16, every loss and the final weights are those of the uninterrupted run."""
    ckpt, port = tmp_path / "ckpt", free_port()
    args = elastic_args(tiny_shards, two_tasks, ckpt, "--spares", "1")
    procs = start_ranks(args, [0, 1, 2], tmp_path, port)
    procs += start_ranks(args, [3], tmp_path, port, script=("tests/dies_in.py", "trainer.loop:save_checkpoint", "2"))
    procs += start_ranks(args, [4], tmp_path, port)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(5)}
    assert codes == [0, 0, 0, -signal.SIGKILL, 0], "".join(logs[r][-1500:] for r in (0, 1, 2, 4))
    assert "in the commit of checkpoint 16; this rank regroups with the other survivors" in logs[0], logs[0][-2000:]

    (event,) = events(ckpt)
    assert (event["event"], event["step"], event["lost_launch_rank"], event["spare_launch_rank"]) == (
        "spare took over", 16, 3, 4)  # fmt: skip
    assert training_rows(ckpt) == training_rows(pp2_dp2_run)
    for step in (16, TOTAL):
        here, there = checkpoint_tensors(ckpt, step), checkpoint_tensors(pp2_dp2_run, step)
        assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here), step


CHECKPOINTED = {
    "sharded": ("--shard-optimizer",),
    "diloco": ("--dp-mode", "diloco", "--sync-every", "4", "--diloco-fragments", "2", "--diloco-overlap-steps", "1"),
    "local": ("--dp-mode", "local", "--sync-every", "3"),  # checkpoint 8 falls between syncs
}


@pytest.mark.ranks
@pytest.mark.parametrize("mode", sorted(CHECKPOINTED))
def test_where_no_replica_holds_the_lost_state_the_spare_and_the_survivors_go_through_the_last_checkpoint(
    pp2_dp2_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path, mode: str
) -> None:
    """--shard-optimizer: rank 3's share of stage 1's AdamW moments is gone with it; streaming
    DiLoCo and local SGD: its replica's own weights (and outer state) and moments are. So no
    live replica can hand the spare its state. SIGKILL rank 3 after step 10: every rank, the
    spare too, loads checkpoint 8 in-process and the two replicas train on. Every step's last
    row and the final checkpoint equal the uninterrupted run's (ZeRO-1: the all-reduce run's, to
    rounding; DiLoCo and local SGD: their own runs', bit for bit, as resumes are)."""
    ckpt = tmp_path / "ckpt"
    flags, oracle = CHECKPOINTED[mode], pp2_dp2_run
    if mode != "sharded":  # an uninterrupted run of its own mode
        (tmp_path / "oracle").mkdir()
        oracle = tmp_path / "oracle" / "ckpt"
        assert_all_ok(launch(elastic_args(tiny_shards, two_tasks, oracle, *flags), 4, tmp_path / "oracle"))
    args = elastic_args(tiny_shards, two_tasks, ckpt, "--spares", "1", *flags)
    procs = start_ranks(args, range(5), tmp_path, free_port())
    kill_after_rows(procs, ckpt, 10, victim=3)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(5)}
    assert codes == [0, 0, 0, -signal.SIGKILL, 0], "".join(logs[r][-1500:] for r in (0, 1, 2, 4))

    rows = {r["event"]: r for r in events(ckpt)}
    assert sorted(rows) == ["rolled back", "spare took over"]
    assert rows["rolled back"]["step"] == 8 and rows["spare took over"]["spare_launch_rank"] == 4
    ours, expected = last_rows(ckpt), training_rows(oracle)
    assert sorted(ours) == list(range(1, TOTAL + 1))
    if mode != "sharded":
        assert ours == expected
        here, there = checkpoint_tensors(ckpt, TOTAL), checkpoint_tensors(oracle, TOTAL)
        assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)
    else:
        assert [ours[s] for s in expected] == pytest.approx([expected[s] for s in expected], rel=1e-5)
        assert_same_state(final_weights(ckpt), final_weights(oracle))


def pp2_dp1_args(shards: Path, tasks: str, ckpt: Path, *extra: str) -> list[str]:
    return [*train_args(shards, tasks, ckpt, pp=2, dp=1, batch=2, micro=1, accum=2),
            "--total-steps", "24", "--checkpoint-steps", "8", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def pp2_dp1_run(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted pp=2 x dp=1 run of 24 steps, no spares: the oracle of the runs below."""
    tmp = tmp_path_factory.mktemp("pp2_dp1_run")
    assert_all_ok(launch(pp2_dp1_args(tiny_shards, two_tasks, tmp / "ckpt"), 2, tmp))
    return tmp / "ckpt"


@pytest.mark.ranks
def test_with_one_pipeline_every_rank_rolls_back_to_the_last_checkpoint_in_process(
    pp2_dp1_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """pp=2 x dp=1 with one spare (launch rank 2): SIGKILL stage 1 (which writes the metrics)
    after step 11. No live copy of its state exists: rank 0 and the spare load the last
    checkpoint in this same process (no rank restarts) and train on from there. Every row
    before the loss and after the roll-back, and the final checkpoint, are those of an
    uninterrupted run (a run resumed from that checkpoint: resumes are exact)."""
    ckpt = tmp_path / "ckpt"
    procs = start_ranks(pp2_dp1_args(tiny_shards, two_tasks, ckpt, "--spares", "1"), range(3), tmp_path, free_port())
    kill_after_rows(procs, ckpt, 11, victim=1)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(3)}
    assert codes == [0, -signal.SIGKILL, 0], logs[0][-2000:] + logs[2][-2000:]

    rows = read_metrics(ckpt)
    kinds = [r["event"] for r in rows if "event" in r]
    assert kinds == ["spare took over", "rolled back"], kinds
    took_over, back = (next(r for r in rows if r.get("event") == kind) for kind in kinds)
    assert (took_over["lost_launch_rank"], took_over["spare_launch_rank"], took_over["replicas"]) == (1, 2, 1)
    assert back["step"] in (8, 16) and back["step"] < back["from_step"] == took_over["step"] and back["rollback_s"] > 0
    split = rows.index(back)
    before = [(r["step"], r["loss"]) for r in rows[:split] if "loss" in r]
    after = [(r["step"], r["loss"]) for r in rows[split:] if "loss" in r]
    oracle = training_rows(pp2_dp1_run)
    assert [s for s, _ in before] == list(range(1, len(before) + 1)) and len(before) >= 11
    assert [s for s, _ in after] == list(range(back["step"] + 1, 25))
    assert all(loss == oracle[step] for step, loss in before + after)
    here, there = checkpoint_tensors(ckpt, 24), checkpoint_tensors(pp2_dp1_run, 24)
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)


@pytest.mark.ranks
@pytest.mark.parametrize("dp", [2, 1])
def test_a_spare_takes_the_place_of_a_rank_with_a_preemption_notice_and_no_step_is_lost(
    pp2_dp2_run: Path, pp2_dp1_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path, dp: int
) -> None:
    """SIGTERM to the last stage of the last replica (at dp=1 the metrics writer) after step 5,
    one spare waiting, no --elastic: instead of the whole run stopping, every rank commits that
    step, the noticed rank leaves (exit 0) and the spare takes its place - at dp=2 handed the
    stage's state by the other replica, at dp=1 loading the step just committed with rank 0. No
    step is redone (training_rows refuses a step reported twice); every loss and the final
    checkpoint are the uninterrupted run's, bit for bit."""
    ckpt, world = tmp_path / "ckpt", 2 * dp
    args = elastic_args(tiny_shards, two_tasks, ckpt) if dp == 2 else pp2_dp1_args(tiny_shards, two_tasks, ckpt)
    oracle, noticed = (pp2_dp2_run, 3) if dp == 2 else (pp2_dp1_run, 1)
    port = free_port()  # a 50 ms emulated latency slows the steps: the spare is asking well before step 5
    procs = start_ranks([*args, "--spares", "1", "--link-latency-ms", "50"], range(world + 1), tmp_path, port)
    wait_for_rows(procs, 1, ckpt)  # the run's store is up
    waiting = store_client(port)  # the notice finds the spare waiting (one not yet asking is no spare)
    while not waiting.check([f"spares/ask/{world}"]):
        assert procs[world].poll() is None, (tmp_path / f"rank{world}.log").read_text()[-2000:]
        time.sleep(0.05)
    signal_after_rows(procs, ckpt, 5, victim=noticed, how=signal.SIGTERM)
    codes = wait_all(procs)
    logs = {rank: (tmp_path / f"rank{rank}.log").read_text() for rank in range(world + 1)}
    assert codes == [0] * (world + 1), "".join(log[-1500:] for log in logs.values())
    ours, expected = training_rows(ckpt), training_rows(oracle)
    assert ours == expected
    preempted, took_over = events(ckpt)
    left = f"preempted: step {preempted['step']} is committed and this rank leaves, "
    assert left in logs[noticed] and "a spare takes its place" in logs[noticed], logs[noticed][-2000:]
    assert f"spare rank {world} took the place of launch rank {noticed}" in logs[world], logs[world][-2000:]
    assert preempted["event"] == "preempted" and preempted["noticed_launch_ranks"] == [noticed]
    assert took_over["event"] == "spare took over" and took_over["step"] == preempted["step"] >= 5
    replaced = (took_over["lost_launch_rank"], took_over["spare_launch_rank"], took_over["replicas"])
    assert replaced == (noticed, world, dp)
    assert preempted["step"] in complete_steps(ckpt)  # committed before the rank left
    last = max(expected)
    here, there = checkpoint_tensors(ckpt, last), checkpoint_tensors(oracle, last)
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)


# -- the agreement (comm.membership), on a real store with no process group -----------------


def register(store: dist.TCPStore, current: Membership, *alive: int) -> None:
    for rank in alive:
        store.set(f"{current.key_space}alive/{rank}", "1")


@contextmanager
def beating(port: int, *spares: int) -> Iterator[None]:
    """Spares that asked by hand are alive while this lasts: their beats move as a waiting spare's do."""
    stop = threading.Event()

    def beat() -> None:
        client = store_client(port)
        while not stop.is_set():
            for rank in spares:
                client.add(f"spares/beat/{rank}", 1)
            time.sleep(0.02)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def spare_waiting(port: int, rank: int, fingerprint: str) -> tuple[threading.Thread, list]:
    """``wait_as_spare`` on a thread of its own; what it returns or raises lands in the list."""
    outcome: list = []

    def wait() -> None:
        try:
            outcome.append(wait_as_spare(store_client(port), rank, fingerprint, None, poll_s=0.02))
        except Exception as err:  # noqa: BLE001 - handed to the test, which asserts on it
            outcome.append(err)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, outcome


def test_a_spare_in_a_slot_takes_that_slot_s_place() -> None:
    first = Membership(1, (0, 1), 2, ((3, 4),))  # spare 4 holds launch rank 3's slot
    assert first.launch_ranks() == [0, 1, 2, 4]
    assert first.topology(4) == Topology(3, 2, 2) and first.holds(4) and not first.holds(3)
    with pytest.raises(ValueError, match="launch rank 3 holds no place in generation 1"):
        first.topology(3)
    shrunk = Membership(2, (1,), 2, ((3, 4),))  # replica 0 left: the spare is rank 1 now
    assert shrunk.topology(4) == Topology(1, 2, 1) and shrunk.launch_ranks() == [2, 4]
    again = Membership(3, (1,), 2, ((3, 5),))  # spare 4 was lost in turn, and spare 5 took the slot
    assert again.new_stand_ins(shrunk) == [(3, 5)] and again.launch_ranks() == [2, 5]
    assert Membership.from_record(json.loads(json.dumps({**again.__dict__}))) == again


def test_the_first_admitted_spare_takes_a_lost_rank_s_slot(store: tuple[dist.TCPStore, int]) -> None:
    """Rank 3 of pp=2 x dp=2 is lost; rank 2, its pipeline's other stage, survives. Spare 4
    asked with other settings and is refused; spare 5 takes slot 3, and every survivor reads
    the same generation."""
    main, port = store
    current = Membership(0, (0, 1), 2)
    publish(main, current, [[0, 2], [2, 4]])
    (wrong, refused), (right, taken) = spare_waiting(port, 4, "other"), spare_waiting(port, 5, "settings")
    while not main.check(["spares/ask/4", "spares/ask/5"]):
        time.sleep(0.01)
    register(main, current, 0, 1, 2)
    mark_lost(main, current, 3, "killed")
    pool = SparePool(4, 2, "settings")
    chosen = next_membership(main, current, 0, settle_s=10, spares=pool)
    assert chosen.replicas == (0, 1) and chosen.stand_ins == ((3, 5),) and chosen.generation == 1
    assert next_membership(store_client(port), current, 2, settle_s=10, spares=pool) == chosen
    wrong.join(10), right.join(10)
    assert isinstance(refused[0], ValueError) and "refused spare rank 4: its settings differ" in str(refused[0])
    membership, stand_ins, live = taken[0]
    assert membership == chosen and stand_ins == [(3, 5)] and live["layers"] == [[0, 2], [2, 4]]


def test_a_rank_whose_heartbeat_stands_still_is_lost_and_a_slow_survivor_is_waited_for(
    store: tuple[dist.TCPStore, int],
) -> None:
    """Nobody marks a SIGKILLed rank: its heartbeat stops. Rank 3's stands still and it is
    replaced; rank 2 is slow to register but still beats, so it keeps its place."""
    main, port = store
    current = Membership(0, (0, 1), 2)
    for rank in range(4):
        main.set(f"gen0/heartbeat/{rank}", json.dumps({"beat": 1, "exit": None}))
    main.set("spares/ask/4", "settings ")

    def slow_survivor() -> None:  # beats every 0.1 s and registers after 1 s (> silent_s)
        mine = store_client(port)
        for beat in range(2, 12):
            mine.set("gen0/heartbeat/2", json.dumps({"beat": beat, "exit": None}))
            time.sleep(0.1)
        register(mine, current, 2)

    thread = threading.Thread(target=slow_survivor, daemon=True)
    thread.start()
    register(main, current, 0, 1)
    with beating(port, 4):
        chosen = next_membership(main, current, 0, settle_s=10, spares=SparePool(4, 1, "settings"), silent_s=0.5)
    thread.join(10)
    assert chosen.replicas == (0, 1) and chosen.stand_ins == ((3, 4),)


def test_a_spare_that_died_while_waiting_is_refused_and_the_next_one_takes_the_slot(
    store: tuple[dist.TCPStore, int],
) -> None:
    """Spare 4 asked and then died (its beat stands still); spare 5 waits alive. Rank 3 is lost:
    its slot goes to spare 5, not to the first spare in launch order, and spare 4 is refused,
    so no later regroup offers it either."""
    main, port = store
    current = Membership(0, (0, 1), 2)
    publish(main, current, [[0, 2], [2, 4]])
    main.set("spares/ask/4", "settings ")
    main.add("spares/beat/4", 7)  # as far as it got
    thread, taken = spare_waiting(port, 5, "settings")
    while not main.check(["spares/ask/5"]):
        time.sleep(0.01)
    register(main, current, 0, 1, 2)
    mark_lost(main, current, 3, "killed")
    chosen = next_membership(main, current, 0, settle_s=10, spares=SparePool(4, 2, "settings"), silent_s=0.5)
    thread.join(10)
    assert chosen.stand_ins == ((3, 5),) and taken[0][1] == [(3, 5)]
    assert "it stood still for 0.5s while it waited" in main.get("spares/refused/4").decode()
    assert SparePool(4, 2, "settings").ready(main) == []


def test_too_few_spares_or_a_replica_leaving_on_purpose_drop_the_pipeline(store: tuple[dist.TCPStore, int]) -> None:
    """Replica 1 lost both ranks and one spare waits: it cannot be mended, so it leaves (and the
    spare stays free). Next, replica 2 leaves on purpose (a preemption notice): it is not
    mended either, though a spare is free. A spare lost in turn is replaced like any rank."""
    main, port = store
    current = Membership(0, (0, 1, 2), 2)
    main.set("spares/ask/6", "settings ")
    main.set("spares/ask/7", "settings ")
    with beating(port, 6, 7):
        pool = SparePool(6, 2, "settings")
        register(main, current, 0, 1, 4, 5)
        mark_lost(main, current, 2, "killed")
        mark_lost(main, current, 3, "killed")
        mark_lost(main, current, 0, "an error")  # replica 0's rank 0 too, after registering: alive wins
        chosen = next_membership(main, current, 0, settle_s=10, spares=SparePool(6, 1, "settings"))
        assert chosen.replicas == (0, 2) and chosen.stand_ins == () and not main.check(["spares/taken/6"])

        current = Membership(1, (0, 1, 2), 2, ((3, 6),))  # spare 6 held slot 3 ...
        register(main, current, 0, 1, 2)
        mark_lost(main, current, 6, "killed")  # ... and is lost in turn
        mark_left(main, current, 4, "preempted")
        mark_left(main, current, 5, "preempted")
        chosen = next_membership(main, current, 0, settle_s=10, spares=pool)
        assert chosen.replicas == (0, 1) and chosen.stand_ins == ((3, 7),)


def test_a_spare_with_a_preemption_notice_withdraws_its_offer(store: tuple[dist.TCPStore, int]) -> None:
    """A waiting spare that gets SIGTERM leaves at once, and is no longer offered to a regroup."""
    main, port = store
    publish(main, Membership(0, (0, 1), 2), [[0, 2], [2, 4]])
    notice = threading.Event()
    outcome: list = []
    thread = threading.Thread(
        target=lambda: outcome.append(wait_as_spare(store_client(port), 4, "settings", None, notice.is_set, 0.02))
    )
    thread.start()
    while not main.check(["spares/ask/4"]):
        time.sleep(0.01)
    assert SparePool(4, 1, "settings").ready(main) == [4]
    notice.set()
    thread.join(10)
    assert outcome == [None] and SparePool(4, 1, "settings").ready(main) == []


def test_a_spare_that_was_not_needed_leaves_when_the_run_finishes(store: tuple[dist.TCPStore, int]) -> None:
    main, port = store
    publish(main, Membership(0, (0, 1), 2), [[0, 2], [2, 4]])
    thread, outcome = spare_waiting(port, 4, "settings")
    while not main.check(["spares/ask/4"]):
        time.sleep(0.01)
    main.set(FINISHED, "1")
    thread.join(10)
    assert outcome == [None]


# -- flags ------------------------------------------------------------------------------------


def test_spares_are_ranks_after_the_pipelines_and_torchrun_s_world_size_counts_them(
    tiny_shards: Path, two_tasks: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.cli import config_from_args, parse_args

    args = [*elastic_args(tiny_shards, two_tasks, tmp_path / "ckpt", "--spares", "2"),
            "--dist-url", "tcp://127.0.0.1:7033"]  # fmt: skip

    def config(rank: int, *extra: str) -> RunConfig:
        return config_from_args(parse_args([*args, "--rank", str(rank), *extra]))

    spare, rank0 = config(5), config(0)
    assert spare.spare_rank == 5 and spare.launch_rank == 5 and rank0.spare_rank is None and rank0.launch_rank == 0
    assert spare.fingerprint() == rank0.fingerprint()  # a spare runs the same settings
    with pytest.raises(ValueError, match=r"--rank 6 is outside 0\.\.5 \(4 ranks, then --spares 2 from rank 4\)"):
        config(6)
    with pytest.raises(ValueError, match=r"--world-size 6 != .* = 4; make them agree \(spares are not counted\)"):
        config(0, "--world-size", "6")
    no_world = [a for i, a in enumerate(args) if "--world-size" not in args[max(0, i - 1) : i + 1]]
    monkeypatch.setenv("WORLD_SIZE", "6")  # torchrun --nproc-per-node 6: the pipelines' 4 and 2 spares
    assert config_from_args(parse_args([*no_world, "--rank", "4"])).spare_rank == 4
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"\$WORLD_SIZE 4 != .* \+ --spares 2 = 6"):
        config_from_args(parse_args([*no_world, "--rank", "0"]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dist-url", "file:///tmp/rendezvous"], "--spares needs a tcp://host:port --dist-url"),
        (["--min-replicas", "2"], "--min-replicas applies to --elastic runs"),
        (["--spares", "-1"], "--spares -1 must be 0 or more"),
    ],
)
def test_bad_spare_settings_are_one_line_errors(
    tiny_shards: Path, two_tasks: str, tmp_path: Path, extra: list[str], message: str
) -> None:
    from trainer.cli import config_from_args, parse_args

    args = [*elastic_args(tiny_shards, two_tasks, tmp_path / "ckpt", "--spares", "1"), "--rank", "0",
            "--dist-url", "tcp://127.0.0.1:7033", *extra]  # fmt: skip
    with pytest.raises(ValueError) as err:
        config_from_args(parse_args(args))
    assert message in str(err.value)
