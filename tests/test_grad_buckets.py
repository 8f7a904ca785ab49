"""Gradient buckets summed over the replicas during the last backward (data_parallel.buckets)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comm.lane import Lane
from comm.trace import LANES, Tracer
from data_parallel.buckets import GradientBuckets
from pipeline.schedule import gpipe_step, one_f_one_b_step, zero_bubble_step
from tests.helpers import assert_all_ok, compare_to_reference, launch, read_metrics, train_args
from tests.toy_pipeline import HIDDEN, SEQ, TOY_SPEC, KeyedLoopbackComm, ToyBlocks, toy_micro_batches
from trainer.cli import config_from_args, parse_args

COMPUTE = {LANES.index("forward compute"), LANES.index("backward compute")}


class Done:
    def __init__(self, result: object) -> None:
        self.result = result

    def wait(self) -> object:
        return self.result


class SendingComm(KeyedLoopbackComm):
    """A stage's neighbours, and a data-parallel lane that runs each job at once."""

    def __init__(self, stage: int, stages: int) -> None:
        super().__init__(stage, stages)
        self.tracer = Tracer(0)

    def in_background(self, job):
        return Done(job())


@pytest.mark.parametrize("schedule", [gpipe_step, one_f_one_b_step, zero_bubble_step])
def test_buckets_leave_in_order_during_the_last_backward_with_final_gradients(schedule) -> None:
    stages, micro = 3, 5
    for s in range(stages):
        reference = ToyBlocks(first=s == 0)
        torch.manual_seed(3)
        gpipe_step(reference, KeyedLoopbackComm(s, stages), toy_micro_batches(s, stages, micro), TOY_SPEC)

        stage = ToyBlocks(first=s == 0)
        params = list(stage.parameters())
        buckets = GradientBuckets(params, exclude=None, bucket_bytes=1)  # one parameter per bucket
        comm = SendingComm(s, stages)
        sent = []  # (bucket, its gradients as sent, compute spans completed by then)

        def record(k: int, flat: torch.Tensor, comm=comm, sent=sent) -> None:
            sent.append((k, flat.clone(), [e["name"] for e in comm.tracer.events if e["tid"] in COMPUTE]))

        buckets.start(comm, record)
        torch.manual_seed(3)
        schedule(stage, comm, toy_micro_batches(s, stages, micro), replace(TOY_SPEC, watch=buckets))
        assert buckets.finish(lambda: torch.ones(())) == 1
        assert [k for k, _, _ in sent] == list(range(len(params)))  # every bucket once, in order
        assert [b[0] for b in buckets.buckets] == params[::-1]  # the order a backward forms them
        for k, flat, _ in sent:  # nothing was added to a bucket after it left
            assert torch.equal(flat, buckets.flats[k]), (s, k)
        for name, p in stage.named_parameters():  # the views hold the gradients the schedule forms
            torch.testing.assert_close(p.grad, reference.get_parameter(name).grad, rtol=1e-5, atol=1e-6)
        # the first bucket left before the last compute span (B, or under zb1 W) had ended
        spans = [e["name"] for e in comm.tracer.events if e["tid"] in COMPUTE]
        assert spans[-1] in (f"B{micro - 1}", f"W{micro - 1}")
        assert len(sent[0][2]) < len(spans), (s, sent[0][2][-3:])


def test_a_gradient_accumulated_after_its_bucket_left_is_an_error() -> None:
    stage = ToyBlocks(first=False)
    buckets = GradientBuckets(list(stage.parameters()), exclude=None, bucket_bytes=1)
    buckets.start(SendingComm(0, 1), lambda k, flat: None)
    buckets.arm(())
    x = torch.randn(1, SEQ, HIDDEN)
    stage(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"accumulated twice.*--dp-bucket-mb 0"):
        stage(x).sum().backward()


def test_a_replaced_gradient_is_named_before_a_step_sums_it() -> None:
    stage = ToyBlocks(first=False)
    buckets = GradientBuckets(list(stage.parameters()), exclude=None, bucket_bytes=1 << 20)
    stage.up.weight.grad = torch.zeros_like(stage.up.weight)
    with pytest.raises(RuntimeError, match="gradient was replaced"):
        buckets.start(SendingComm(0, 1), lambda k, flat: None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp-mode", "local", "--sync-every", "4"], "local mode sums its data-parallel messages after the step"),
        (["--dp-mode", "diloco", "--sync-every", "4"], "diloco mode sums"),
        (["--shard-optimizer"], "--shard-optimizer reduce-scatters"),
    ],
)
def test_a_bucket_size_where_nothing_is_bucketed_is_refused(two_tasks: str, flags: list[str], message: str) -> None:
    base = ["--model-name", "m", "--task-name", two_tasks, "--rank", "0", *flags]
    with pytest.raises(ValueError, match=f"--dp-bucket-mb applies to --dp-mode allreduce.*{message}.*drop"):
        config_from_args(parse_args([*base, "--dp-bucket-mb", "5"]))
    config_from_args(parse_args(base))  # the default is not "given"


def test_bucket_size_default_and_given(two_tasks: str) -> None:
    def config(*flags: str):
        return config_from_args(parse_args(["--model-name", "m", "--task-name", two_tasks, "--rank", "0", *flags]))

    assert config().dp.bucket_bytes == 25 * 2**20
    assert config("--dp-bucket-mb", "0.5").dp.bucket_bytes == 2**19
    # ranks launched with the default and one naming it agree on their settings
    assert config("--dp-bucket-mb", "25").fingerprint() == config().fingerprint()
    assert config("--dp-bucket-mb", "5").fingerprint() != config().fingerprint()


def test_lane_runs_in_order_and_fails_every_job_after_a_failure() -> None:
    lane, ran = Lane("test"), []

    def fail() -> None:
        raise RuntimeError("peer lost")

    first = lane.submit(lambda: ran.append(1) or "one")
    failed = lane.submit(fail)
    after = lane.submit(lambda: ran.append(3))
    assert first.wait() == "one"
    for pending in (failed, after):
        with pytest.raises(RuntimeError, match="peer lost"):
            pending.wait()
    assert ran == [1]  # the job after the failure never ran: its collective would pair wrongly
    lane.close()


@pytest.mark.ranks
def test_bucketed_sums_equal_one_sum_after_the_step_and_hf(
    tiny_hf: Path, tiny_shards: Path, mixed_tasks: str, tmp_path: Path
) -> None:
    """pp=2 x dp=2 under zb1: buckets of ~20 KB (a parameter or two each) leave during the last
    backward; the run equals, bit for bit and byte for byte, the run that sums after the step,
    and both equal the HF model trained in one process."""
    runs = {}
    for mb in ("0", "0.02"):
        folder = tmp_path / f"buckets{mb}"
        folder.mkdir()
        args = [*train_args(tiny_shards, mixed_tasks, folder / "ckpt", pp=2, dp=2, batch=2, micro=1, accum=2),
                "--pp-mode", "zb1", "--dp-bucket-mb", mb]  # fmt: skip
        assert_all_ok(launch(args, 4, folder))
        runs[mb] = folder / "ckpt"
    plain, bucketed = (read_metrics(runs[mb]) for mb in ("0", "0.02"))
    for key in ("loss", "grad_norm", "dp_bytes"):
        assert [r[key] for r in bucketed] == [r[key] for r in plain], key
    assert plain[0]["dp_bytes"] > 0
    final = sorted(runs["0"].glob("checkpoint_10/*.safetensors"))
    assert final
    for shard in final:
        theirs, ours = load_file(shard), load_file(runs["0.02"] / "checkpoint_10" / shard.name)
        assert all(torch.equal(ours[k], v) for k, v in theirs.items()), shard.name
    compare_to_reference(tiny_hf, mixed_tasks, runs["0.02"], per_step=8, tmp_path=tmp_path)
