"""Multi-process training on Gloo equals Hugging Face's model trained in one process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from convert.to_hf import convert_to_hf
from tests.helpers import assert_all_ok, hf_reference_training, launch, load_hf_state, read_metrics

STEPS, SEQ, LR, WARMUP, SEED = 10, 32, 2e-3, 2, 7
LOSS_ATOL = 1e-5  # measured: fp32 pipelines agree with the reference to ~1e-6 over 10 steps
WEIGHT_ATOL = 1e-5


def train_args(shards: Path, tasks: str, ckpt: Path, pp: int, dp: int, batch: int, micro: int, accum: int) -> list[str]:
    return [
        "--model-name", str(shards), "--task-name", tasks, "--seq-length", str(SEQ), "--seed", str(SEED),
        "--pipeline-group-size", str(pp), "--data-group-size", str(dp), "--world-size", str(pp * dp),
        "--batch-size", str(batch), "--micro-batch-size", str(micro), "--gradient-accumulate-step", str(accum),
        "--lr", str(LR), "--warmup-steps", str(WARMUP), "--total-steps", str(STEPS),
        "--checkpoint-path", str(ckpt), "--checkpoint-steps", "5",
    ]  # fmt: skip


def compare_to_reference(tiny_hf: Path, tasks: str, ckpt: Path, per_step: int, tmp_path: Path) -> dict:
    ref_losses, ref_norms, ref_state = hf_reference_training(tiny_hf, tasks, SEQ, SEED, per_step, STEPS, LR, WARMUP)
    rows = read_metrics(ckpt)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ours = [r["loss"] for r in rows]
    assert ours == pytest.approx(ref_losses, abs=LOSS_ATOL, rel=0)
    assert ours[-1] < ours[0]  # it learns: the comparison is not between two frozen models
    # the clipping norm spans every stage and replica, as the single model's does
    assert [r["grad_norm"] for r in rows] == pytest.approx(ref_norms, rel=1e-5)
    assert max(ref_norms) > 1.0  # so clipping at 1.0 really acted
    state = load_hf_state(convert_to_hf(ckpt, tmp_path / "hf"))
    assert state.keys() == ref_state.keys()
    for key, ref in ref_state.items():
        torch.testing.assert_close(state[key], ref, atol=WEIGHT_ATOL, rtol=0, msg=key)
    return state


def test_pp2_matches_hf_with_uneven_split(tiny_hf: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    results = launch(train_args(tiny_shards, two_tasks, ckpt, pp=2, dp=1, batch=4, micro=2, accum=1), 2, tmp_path)
    assert_all_ok(results)
    # 5 layers on 2 stages: the first stage holds one more
    assert "layers [0, 1, 2]" in results[0].output and "layers [3, 4]" in results[1].output
    state = compare_to_reference(tiny_hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)

    # The step-5 checkpoint of this pp=2 run resumes under pp=1 and ends where the run ended.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ckpt / "checkpoint_5", resumed / "ckpt" / "checkpoint_5")
    (resumed / "ckpt" / "latest").write_text("5\n")
    args = train_args(tiny_shards, two_tasks, resumed / "ckpt", pp=1, dp=1, batch=4, micro=4, accum=1)
    assert_all_ok(launch(args, 1, resumed))
    rows = read_metrics(resumed / "ckpt")
    assert [r["step"] for r in rows] == list(range(6, STEPS + 1))
    expected = [r["loss"] for r in read_metrics(ckpt)][5:]
    assert [r["loss"] for r in rows] == pytest.approx(expected, abs=LOSS_ATOL, rel=0)
    resumed_state = load_hf_state(convert_to_hf(resumed / "ckpt", resumed / "hf"))
    for key, value in state.items():
        torch.testing.assert_close(resumed_state[key], value, atol=WEIGHT_ATOL, rtol=0, msg=key)


def test_pp2_dp2_matches_hf_and_a_single_rank(tiny_hf: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    # Global batch 8 either way: 2 per replica x 2 replicas x 2 accumulation rounds, or 8 at once.
    grid = tmp_path / "grid"
    grid_args = train_args(tiny_shards, two_tasks, grid / "ckpt", pp=2, dp=2, batch=2, micro=1, accum=2)
    grid.mkdir()
    assert_all_ok(launch(grid_args, 4, grid))
    grid_state = compare_to_reference(tiny_hf, two_tasks, grid / "ckpt", per_step=8, tmp_path=grid)

    single = tmp_path / "single"
    single.mkdir()
    single_args = train_args(tiny_shards, two_tasks, single / "ckpt", pp=1, dp=1, batch=8, micro=4, accum=1)
    assert_all_ok(launch(single_args, 1, single))
    single_losses = [r["loss"] for r in read_metrics(single / "ckpt")]
    grid_losses = [r["loss"] for r in read_metrics(grid / "ckpt")]
    assert single_losses == pytest.approx(grid_losses, abs=LOSS_ATOL, rel=0)
    single_state = load_hf_state(convert_to_hf(single / "ckpt", single / "hf"))
    for key, value in grid_state.items():
        torch.testing.assert_close(single_state[key], value, atol=WEIGHT_ATOL, rtol=0, msg=key)
