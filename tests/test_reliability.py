"""Crashes, damaged checkpoints and lost peers: no lost work, no silent fresh start, no hang."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from comm.topology import Topology
from data_parallel.allreduce import AllReduce
from data_parallel.base import Trained
from modules import family_for, load_config
from pipeline.stage import Stage
from tests.helpers import OFFLINE_ENV, ROOT, assert_all_ok, free_port, launch, read_metrics, start_ranks
from trainer.checkpoint import CheckpointError, complete_steps, load_checkpoint
from trainer.config import DataParallelConfig, OptimConfig
from trainer.optimizer import StageOptimizer

STEPS = 24


def run_args(shards: Path, tasks: str, ckpt: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "--model-name", str(shards), "--task-name", tasks, "--seq-length", "64", "--seed", "3",
        "--pipeline-group-size", "2", "--batch-size", "8", "--micro-batch-size", "2",
        "--lr", "1e-3", "--warmup-steps", "3", "--total-steps", str(steps),
        "--checkpoint-path", str(ckpt), "--checkpoint-steps", "4", *extra,
    ]  # fmt: skip


def start(args: list[str], world: int, logs: Path) -> list[subprocess.Popen]:
    return start_ranks(args, range(world), logs, free_port(), log_name="started{}.log")


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


@pytest.mark.ranks
def test_keep_checkpoints_prunes_old_ones(uninterrupted: Path) -> None:
    assert complete_steps(uninterrupted) == [STEPS - 4, STEPS]
    assert (uninterrupted / "latest").read_text().strip() == str(STEPS)


@pytest.mark.ranks
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

    relaunch_equals(uninterrupted, args, ckpt, tmp_path, f"resumed from step {killed_at}")


def relaunch_equals(uninterrupted: Path, args: list[str], ckpt: Path, tmp_path: Path, what: str) -> None:
    """The same command again finishes the run: every step's loss and the final weights are the
    uninterrupted run's, bit for bit (the steps redone after a resume included)."""
    assert_all_ok(launch(args, 2, tmp_path))
    after = {r["step"]: r["loss"] for r in read_metrics(ckpt) if "loss" in r}  # rows after the resume win
    expected = {r["step"]: r["loss"] for r in read_metrics(uninterrupted)}
    assert after == expected, what
    ours, reference = final_state(ckpt), final_state(uninterrupted)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in reference), what


@pytest.mark.ranks
def test_sigterm_to_the_launch_script_commits_the_step_and_a_relaunch_equals_uninterrupted(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """example_scripts/launch_local.sh passes a preemption notice on to its ranks and waits for
    them: they commit the step they are in and exit 0, and so does the script."""
    ckpt = tmp_path / "ckpt"
    args = run_args(tiny_shards, two_tasks, ckpt, extra=("--keep-checkpoints", "2"))
    cmd = ["bash", str(ROOT / "example_scripts" / "launch_local.sh"), "2", *args,
           "--dist-url", f"tcp://127.0.0.1:{free_port()}"]  # fmt: skip
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "launcher.log", "w") as out:
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_rows(ckpt, 6, [launcher])
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = (tmp_path / "launcher.log").read_text()
    assert code == 0, output[-3000:]
    stopped = max(r["step"] for r in read_metrics(ckpt) if "loss" in r)
    assert stopped < STEPS, "the run finished before the notice"
    assert int((ckpt / "latest").read_text()) == stopped and stopped in complete_steps(ckpt)
    assert output.count(f"preempted (SIGTERM): step {stopped} committed") == 2, output[-3000:]  # both ranks
    relaunch_equals(uninterrupted, args, ckpt, tmp_path, f"preempted at step {stopped}")


def stage_for(shards: Path, layers: range, first: bool, last: bool) -> tuple[Stage, StageOptimizer]:
    config = load_config(shards)
    stage = Stage(family_for(config.model_type), config, layers, first, last)
    one_rank = SimpleNamespace(topo=SimpleNamespace(data_size=1))  # loading communicates nothing
    params = list(stage.parameters())
    sync = AllReduce(DataParallelConfig(), Trained(params), one_rank, torch.device("cpu"))
    return stage, StageOptimizer(OptimConfig(1e-3, 10), sync)


@pytest.mark.ranks
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


@pytest.mark.ranks
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


@pytest.mark.ranks
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


@pytest.mark.ranks
def test_fp16_overflow_on_one_stage_skips_the_step_on_every_stage(
    tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    # Layer 0 (stage 0) made to overflow in fp16 backward while computing nearly the same
    # function: its MLP's inner weights x300, outer weights /300. Stage 1's gradients stay finite.
    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    layer = load_file(shards / "layer_0.safetensors")
    layer["mlp.dense_h_to_4h.weight"] *= 300
    layer["mlp.dense_4h_to_h.weight"] /= 300
    save_file(layer, shards / "layer_0.safetensors")
    ckpt = tmp_path / "ckpt"
    args = run_args(shards, two_tasks, ckpt, steps=12, extra=("--fp16", "--checkpoint-steps", "1"))
    assert_all_ok(launch(args, 2, tmp_path))
    rows = read_metrics(ckpt)
    assert rows[0].get("skipped") and rows[0]["grad_norm"] is None
    assert rows[1]["loss_scale"] == rows[0]["loss_scale"] / 2  # halved after the overflow
    skipped = [r["step"] for r in rows if r.get("skipped")]
    trained = [r["step"] for r in rows if not r.get("skipped")]
    assert trained and trained[0] > skipped[-1]  # it recovers once the scale is small enough

    # stage 1's own gradients were finite, yet it skipped every step stage 0 overflowed
    head_before = load_file(shards / "lm_head.safetensors")
    for step in skipped:
        head = load_file(ckpt / f"checkpoint_{step}" / "lm_head.safetensors")
        assert all(torch.equal(head[k], head_before[k]) for k in head_before), f"stage 1 stepped at {step}"
        assert load_file(ckpt / f"checkpoint_{step}" / "optim_lm_head.safetensors") == {}  # no optimizer step
    head_after = load_file(ckpt / f"checkpoint_{trained[0]}" / "lm_head.safetensors")
    assert not all(torch.equal(head_after[k], head_before[k]) for k in head_before)


@pytest.mark.ranks
def test_bf16_trains_close_to_fp32(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        ckpt = tmp_path / precision
        extra = ("--bf16",) if precision == "bf16" else ()
        (tmp_path / f"logs_{precision}").mkdir()
        assert_all_ok(
            launch(run_args(tiny_shards, two_tasks, ckpt, steps=12, extra=extra), 2, tmp_path / f"logs_{precision}")
        )
        losses[precision] = [r["loss"] for r in read_metrics(ckpt)]
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.2  # it learns
    assert losses["bf16"] != losses["fp32"]  # bf16 really computed in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


@pytest.mark.ranks
def test_fp32_stops_after_consecutive_non_finite_steps(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    layer = load_file(shards / "layer_3.safetensors")
    layer["attention.dense.bias"][0] = float("inf")
    save_file(layer, shards / "layer_3.safetensors")
    args = run_args(shards, two_tasks, tmp_path / "ckpt", extra=("--max-nonfinite-steps", "2"))
    results = launch(args, 2, tmp_path)
    for result in results:
        assert result.returncode == 1, result.output[-2000:]
        assert "2 steps in a row (up to step 2) had non-finite" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "ckpt" / "latest").exists()  # nothing half-trained was saved


@pytest.mark.ranks
def test_8bit_adam_resumes_exactly(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    extra = ("--optimizer", "8bit-adam", "--checkpoint-steps", "3")
    whole = tmp_path / "whole"
    whole.mkdir()
    assert_all_ok(launch(run_args(tiny_shards, two_tasks, whole / "ckpt", steps=6, extra=extra), 2, whole))
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "ckpt" / "checkpoint_3", resumed / "ckpt" / "checkpoint_3")
    (resumed / "ckpt" / "latest").write_text("3\n")
    assert_all_ok(launch(run_args(tiny_shards, two_tasks, resumed / "ckpt", steps=6, extra=extra), 2, resumed))
    optim = load_file(whole / "ckpt" / "checkpoint_6" / "optim_layer_0.safetensors")
    assert any(v.dtype == torch.uint8 for v in optim.values())  # 8-bit moments were saved
    a = {p.name: load_file(p) for p in (whole / "ckpt" / "checkpoint_6").glob("*.safetensors")}
    b = {p.name: load_file(p) for p in (resumed / "ckpt" / "checkpoint_6").glob("*.safetensors")}
    assert a.keys() == b.keys()
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


@pytest.mark.ranks
def test_torchrun_restart_resumes_and_matches_uninterrupted(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    import psutil

    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--master-port", str(free_port()), str(ROOT / "dist_clm_train.py"),
           *run_args(tiny_shards, two_tasks, ckpt, extra=("--keep-checkpoints", "2"))]  # fmt: skip
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "torchrun.log", "w") as log:
        agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # no --rank anywhere
        try:
            wait_for_rows(ckpt, 10, [agent])
            workers = [
                p
                for p in psutil.Process(agent.pid).children(recursive=True)
                if "dist_clm_train" in " ".join(p.cmdline())
            ]
            assert len(workers) == 2
            workers[1].kill()  # the agent restarts the group, which resumes from latest
            assert agent.wait(timeout=240) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
        finally:
            if agent.poll() is None:  # leave no orphaned workers behind
                for child in psutil.Process(agent.pid).children(recursive=True):
                    child.kill()
                agent.kill()
    assert len(read_metrics(ckpt)) < STEPS + 10  # it resumed rather than started over
    ours, reference = final_state(ckpt), final_state(uninterrupted)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in reference)


@pytest.mark.ranks
def test_a_run_token_keeps_out_a_rank_without_it_and_a_second_run_at_the_address_is_refused(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Rank 0 of a run guarded by a token (given in the environment); a process posing as rank 1
    with another token is refused in one line while rank 0 waits on; the real rank 1 gets in. A
    second run launched at the same address while the first trains is refused on both its ranks,
    naming the run there. The guarded run's losses and weights are the uninterrupted run's, and
    its token is in none of its files or logs."""
    ckpt, secret = tmp_path / "ckpt", "s3cret-of-this-run"
    # an emulated link's latency (which changes no value) keeps it training while the second run starts
    args = run_args(tiny_shards, two_tasks, ckpt, extra=("--keep-checkpoints", "2", "--link-latency-ms", "150"))
    port, guarded = free_port(), {"DIST_CLM_RUN_TOKEN": secret}
    procs = start_ranks(args, [0], tmp_path, port, env=guarded, log_name="guarded{}.log")
    impostor = start_ranks([*args, "--run-token", "a guess"], [1], tmp_path, port, log_name="impostor{}.log")
    try:
        assert impostor[0].wait(timeout=120) == 1
        said = (tmp_path / "impostor1.log").read_text()
        assert "rank 1: refused by the run at" in said and "its run token is not this run's" in said, said[-2000:]
        procs += start_ranks(args, [1], tmp_path, port, env=guarded, log_name="guarded{}.log")
        wait_for_rows(ckpt, 3, procs)
        other = run_args(tiny_shards, two_tasks, tmp_path / "other", extra=("--seed", "4"))
        second = start_ranks(other, [0, 1], tmp_path, port, log_name="second{}.log")
        assert [p.wait(timeout=120) for p in second] == [1, 1]
        assert all(p.poll() is None for p in procs), "the guarded run ended before the second run was refused"
        for rank, state in ((0, "training"), (1, "already training")):
            said = (tmp_path / f"second{rank}.log").read_text()
            assert f"another run is {state} at tcp://127.0.0.1:{port} (2 ranks, rank 0 on " in said, said[-2000:]
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
    finally:
        for p in procs + impostor:
            if p.poll() is None:
                p.kill()
    losses = [{r["step"]: r["loss"] for r in read_metrics(run)} for run in (ckpt, uninterrupted)]
    assert losses[0] == losses[1]
    ours, reference = final_state(ckpt), final_state(uninterrupted)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    written = [p for p in [*ckpt.rglob("*"), *tmp_path.glob("guarded*.log")] if p.is_file()]
    assert written and not any(secret.encode() in p.read_bytes() for p in written)


class OneRank:
    """A loopback communicator for one rank (pp = dp = 1): its gathers hold its own object."""

    topo = Topology(0, 1, 1)

    def all_gather_object(self, obj: object) -> list[object]:
        return [obj]


def test_a_checkpoint_that_cannot_be_written_is_abandoned_and_the_previous_one_stays(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up half-way through a checkpoint (an injected ENOSPC after one file):
    the error names the file, the reason and the room; nothing of that checkpoint is left,
    ``latest`` and the previous checkpoint are untouched, and it still loads."""
    import errno

    import trainer.checkpoint as checkpoint
    from trainer.checkpoint import CheckpointWriteError, Disks, file_sha256, save_checkpoint

    ckpt = tmp_path / "ckpt"
    stage, optimizer = stage_for(tiny_shards, range(0, 5), first=True, last=True)
    save = lambda step: save_checkpoint(ckpt, step, stage, optimizer, OneRank(), {"step": step},  # noqa: E731
                                        str(tiny_shards), Disks((0,)))  # fmt: skip
    save(4)
    before = {p.relative_to(ckpt): file_sha256(p) for p in ckpt.rglob("*") if p.is_file()}

    real_save_part, calls = checkpoint.save_part, []

    def fills_the_disk(folder: Path, name: str, tensors: dict) -> Path:
        calls.append(name)
        if len(calls) > 1:  # the first file fits, the second finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / f"{name}.safetensors"))
        return real_save_part(folder, name, tensors)

    monkeypatch.setattr(checkpoint, "save_part", fills_the_disk)
    with pytest.raises(CheckpointWriteError) as failure:
        save(8)
    said = str(failure.value)
    assert f"{ckpt / 'checkpoint_8.tmp' / calls[1]}.safetensors: No space left on device" in said, said
    assert " free there, the last checkpoint took " in said and "still names step 4" in said
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_4", "latest"]  # nothing of step 8 is left
    assert {p.relative_to(ckpt): file_sha256(p) for p in ckpt.rglob("*") if p.is_file()} == before
    assert load_checkpoint(ckpt, stage, optimizer)[0] == 4


@pytest.mark.ranks
def test_a_full_disk_during_a_run_keeps_latest_and_continue_trains_on_to_the_next_try(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Real ranks whose files may not grow past 64 KB (RLIMIT_FSIZE: every checkpoint's optimizer
    files are larger, so the write fails with EFBIG), resumed at step 20 of the uninterrupted
    run with a checkpoint every 2 steps and --on-checkpoint-error continue: step 22's checkpoint
    is abandoned and training goes on; the last one (24) stops the run with exit 1. latest and
    step 20 are untouched throughout, and a relaunch with room to write ends as the run never
    interrupted, bit for bit."""
    ckpt = shutil.copytree(uninterrupted, tmp_path / "ckpt")
    shutil.rmtree(ckpt / f"checkpoint_{STEPS}")
    (ckpt / "latest").write_text("20\n")
    kept = {p: p.read_bytes() for p in (ckpt / "checkpoint_20").iterdir()}
    args = run_args(tiny_shards, two_tasks, ckpt, extra=("--keep-checkpoints", "2", "--checkpoint-steps", "2",
                                                         "--on-checkpoint-error", "continue"))  # fmt: skip
    port, env = free_port(), {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(2):
        line = " ".join([sys.executable, str(ROOT / "dist_clm_train.py"), "--rank", str(rank),
                         "--dist-url", f"tcp://127.0.0.1:{port}", *args])  # fmt: skip
        with open(tmp_path / f"full{rank}.log", "w") as out:
            procs.append(subprocess.Popen(["bash", "-c", f"ulimit -f 64 && exec {line}"], cwd=ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT))  # fmt: skip
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"full{rank}.log").read_text() for rank in range(2)]
    assert codes == [1, 1], logs[0][-3000:]
    assert "checkpoint 22 could not be written" in logs[0] and "training goes on" in logs[0], logs[0][-3000:]
    assert "File too large" in logs[0] and "checkpoint 24 could not be written" in logs[0], logs[0][-3000:]
    assert (ckpt / "latest").read_text() == "20\n" and complete_steps(ckpt) == [20]
    assert not list(ckpt.glob("*.tmp")) and {p: p.read_bytes() for p in (ckpt / "checkpoint_20").iterdir()} == kept
    (event,) = [r for r in read_metrics(ckpt) if r.get("event") == "checkpoint failed"]
    assert event["step"] == 22 and "File too large" in event["error"]

    relaunch_equals(uninterrupted, args, ckpt, tmp_path, "after the full disk")
