"""Multi-process training on Gloo equals Hugging Face's model trained in one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from convert.to_hf import convert_to_hf
from tests.helpers import (
    LOSS_ATOL,
    assert_all_ok,
    assert_same_state,
    compare_to_reference,
    launch,
    load_hf_state,
    read_metrics,
    resume_elsewhere,
    train_args,
)


def test_pp2_matches_hf_with_uneven_split(tiny_hf: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    results = launch(train_args(tiny_shards, two_tasks, ckpt, pp=2, dp=1, batch=4, micro=2, accum=1), 2, tmp_path)
    assert_all_ok(results)
    # 5 layers on 2 stages: the first stage holds one more
    assert "layers [0, 1, 2]" in results[0].output and "layers [3, 4]" in results[1].output
    state = compare_to_reference(tiny_hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)

    # The step-5 checkpoint of this pp=2 run resumes under pp=1 and ends where the run ended.
    resume_elsewhere(tiny_shards, two_tasks, ckpt, state, tmp_path / "resumed")


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
    assert_same_state(load_hf_state(convert_to_hf(single / "ckpt", single / "hf")), grid_state)
