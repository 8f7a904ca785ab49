"""The supervisor (run/supervisor.py) against a fake trainer and a fake elastic controller: what it
does when, with no process group. Steps to the end with evaluations and commits when due, the
rows in order; a replica lost in a step, an evaluation or a commit turned into a regroup and the
same work done again; a preemption notice committed and answered; a failed checkpoint under
--on-checkpoint-error continue. The elastic agreement itself is tested on a real store
(tests/test_spares.py, tests/test_elastic.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comm.process_group import PeerLostError
from comm.topology import Topology
from run.preemption import PreemptionNotice
from run.supervisor import Supervisor
from tests.replicas import NullTracer
from trainer.checkpoint import CheckpointWriteError
from trainer.cli import config_from_args, parse_args
from trainer.state import ReplicasChanged, TrainState

TOTAL = 6


class FakeComm:
    def __init__(self) -> None:
        self.tracer = NullTracer()
        self.topo = Topology(0, 1, 1)
        self.calls: list[str] = []

    def abandon(self, err: Exception) -> None:
        self.calls.append("abandon")

    def quiesce(self, what: str) -> None:
        self.calls.append("quiesce")


class FakeOptimizer:
    def __init__(self) -> None:
        self.rollbacks = 0

    def held_bytes(self) -> int:
        return 1

    def rollback(self) -> None:
        self.rollbacks += 1


class FakeTrainer:
    """What the supervisor drives: a step that trains nothing, an evaluation, a save; ``fail``
    maps (what, step) to the exception the first such call raises."""

    def __init__(self, cfg: object, fail: dict[tuple[str, int], Exception] | None = None) -> None:
        self.cfg, self.fail = cfg, dict(fail or {})
        self.state = TrainState()
        self.comm, self.optimizer = FakeComm(), FakeOptimizer()
        self.stream, self.device, self.is_reporter = None, torch.device("cpu"), True
        self.memory = type("Memory", (), {"reset": lambda self: None})()
        self.calls: list[tuple[str, int]] = []
        self.noticed: dict[int, list[int]] = {}  # step -> the ranks whose notice it agrees on

    @property
    def topo(self) -> Topology:
        return self.comm.topo

    def _maybe_fail(self, what: str, step: int) -> None:
        self.calls.append((what, step))
        err = self.fail.pop((what, step), None)
        if err is not None:
            raise err

    def step(self, batch: object, notice_pending: bool) -> tuple[dict, list[int]]:
        step = self.state.step + 1
        self._maybe_fail("step", step)
        self.state.step = step
        return {"step": step, "loss": 1.0 / step, "lr": 0.1, "tokens_per_s": 1.0}, self.noticed.get(step, [])

    def evaluate(self) -> dict:
        self._maybe_fail("evaluate", self.state.step)
        return {"step": self.state.step, "valid.loss": 0.5, "valid.perplexity": 1.6}

    def save(self) -> None:
        self._maybe_fail("save", self.state.step)


class FakeElastic:
    def __init__(self, trainer: FakeTrainer) -> None:
        self.trainer = trainer
        self.regroups: list[tuple[int, str, str]] = []

    def regroup(self, step: int, why: str = "lost", during: str = "step") -> None:
        self.regroups.append((step, why, during))
        self.trainer.state.events.append({"step": step, "event": "replicas left", "reason": why})

    def grow_if_due(self, commit: object) -> None:
        self.trainer.calls.append(("grow", self.trainer.state.step))

    def enough_spares(self, wanted: int) -> bool:
        return False


def config(tmp_path: Path, tiny_shards: Path, *extra: str) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n')
    args = ["--rank", "0", "--model-name", str(tiny_shards), "--task-name", str(data), "--total-steps", str(TOTAL),
            "--checkpoint-path", str(tmp_path / "ckpt"), "--checkpoint-steps", "4", "--evaluation-data", str(data),
            "--evaluation-steps", "3", *extra]  # fmt: skip
    return config_from_args(parse_args(args))


def rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]


def supervise(trainer: FakeTrainer, elastic: bool = True) -> Supervisor:
    notice = PreemptionNotice(grace_s=30)
    return Supervisor(trainer, notice, FakeElastic(trainer) if elastic else None)


def test_it_steps_to_the_end_evaluating_and_committing_when_due(tmp_path: Path, tiny_shards: Path) -> None:
    trainer = FakeTrainer(config(tmp_path, tiny_shards))
    supervise(trainer, elastic=False).train()
    order = [c for c in trainer.calls if c[0] != "grow"]
    assert order == [("step", 1), ("step", 2), ("step", 3), ("evaluate", 3), ("step", 4), ("save", 4),
                     ("step", 5), ("step", 6), ("evaluate", 6), ("save", 6)]  # fmt: skip
    written = rows(tmp_path)
    assert [r["step"] for r in written] == [1, 2, 3, 3, 4, 5, 6, 6]
    assert [("valid.loss" in r) for r in written] == [False, False, False, True, False, False, False, True]


def test_a_replica_lost_in_a_step_an_evaluation_or_a_commit_is_regrouped_and_the_work_done_again(
    tmp_path: Path, tiny_shards: Path
) -> None:
    fail = {
        ("step", 2): ReplicasChanged(2),  # a sum over the replicas failed: nothing stepped
        ("step", 5): PeerLostError("lost rank 3 during send"),  # a pipeline peer, with spares a regroup too
        ("evaluate", 3): ReplicasChanged(3),
        ("save", 4): PeerLostError("lost rank 2 during the commit"),
    }
    trainer = FakeTrainer(config(tmp_path, tiny_shards, "--spares", "1"), fail)
    supervisor = supervise(trainer)
    supervisor.train()
    assert supervisor.elastic.regroups == [(2, "lost", "step"), (3, "lost", "evaluation"), (4, "lost", "checkpoint"),
                                           (5, "lost", "step")]  # fmt: skip
    # each is done again: step 2 and 5 twice, the evaluation after 3 and the commit of 4 twice
    done = [c for c in trainer.calls if c[0] != "grow"]
    assert done.count(("step", 2)) == done.count(("step", 5)) == 2
    assert done.count(("evaluate", 3)) == done.count(("save", 4)) == 2
    # a lost peer drops the groups (whoever waits on this rank fails at once); in a step the
    # sync forgets what the step carried
    assert trainer.comm.calls.count("abandon") == 2 and trainer.optimizer.rollbacks == 1
    # every step's row once, in order; the regroups' rows before the row of the step redone
    written = rows(tmp_path)
    assert [r["step"] for r in written if "loss" in r] == list(range(1, TOTAL + 1))
    events = [(r["step"], r["event"]) for r in written if "event" in r]
    assert events == [(2, "replicas left"), (3, "replicas left"), (4, "replicas left"), (5, "replicas left")]
    where = [(r["step"], "event" in r) for r in written]
    assert where.index((2, True)) < where.index((2, False)) and where.index((5, True)) < where.index((5, False))


def test_without_elastic_a_lost_peer_stops_the_rank(tmp_path: Path, tiny_shards: Path) -> None:
    trainer = FakeTrainer(config(tmp_path, tiny_shards), {("step", 2): PeerLostError("lost rank 1")})
    with pytest.raises(PeerLostError, match="lost rank 1"):
        supervise(trainer, elastic=False).train()
    assert trainer.comm.calls == [] and trainer.optimizer.rollbacks == 0


def test_a_preemption_notice_commits_the_step_and_stops_every_rank(tmp_path: Path, tiny_shards: Path) -> None:
    trainer = FakeTrainer(config(tmp_path, tiny_shards))
    trainer.noticed[2] = [0]  # the step's sums say rank 0 had a notice
    supervise(trainer, elastic=False).train()
    assert [c for c in trainer.calls if c[0] != "grow"] == [("step", 1), ("step", 2), ("save", 2)]
    last = rows(tmp_path)[-1]
    assert last["step"] == 2 and last["event"] == "preempted" and last["noticed_replicas"] == [0]


def test_a_failed_checkpoint_is_a_row_and_training_goes_on_under_continue(tmp_path: Path, tiny_shards: Path) -> None:
    failed = CheckpointWriteError("checkpoint 4 could not be written (no space)")
    trainer = FakeTrainer(config(tmp_path, tiny_shards, "--on-checkpoint-error", "continue"), {("save", 4): failed})
    supervise(trainer, elastic=False).train()
    assert [c for c in trainer.calls if c[0] == "save"] == [("save", 4), ("save", 6)]
    (row,) = [r for r in rows(tmp_path) if r.get("event") == "checkpoint failed"]
    assert row["step"] == 4 and "no space" in row["error"]
    # without it, the run stops at once (the last checkpoint intact)
    stopping = FakeTrainer(config(tmp_path / "stop", tiny_shards), {("save", 4): failed})
    with pytest.raises(CheckpointWriteError):
        supervise(stopping, elastic=False).train()
