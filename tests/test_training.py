"""Multi-process training on Gloo equals Hugging Face's model trained in one process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from convert.to_hf import convert_to_hf
from data.stream import TokenStream, parse_task_names
from tests.helpers import (
    LOSS_ATOL,
    SEED,
    SEQ,
    assert_all_ok,
    assert_same_state,
    bundled_texts,
    compare_to_reference,
    launch,
    load_hf_state,
    read_metrics,
    resume_elsewhere,
    train_args,
    write_jsonl,
)

pytestmark = pytest.mark.ranks  # every test here starts rank processes


def reference_eval_loss(hf_dir: Path, eval_file: Path, per_batch: int, batches: int) -> float:
    """Mean next-token loss of an HF model on the first evaluation batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    stream = TokenStream(parse_task_names(str(eval_file)), AutoTokenizer.from_pretrained(hf_dir), SEQ, SEED)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(batches):
            batch = stream.next_batch(per_batch)
            logits = model(batch.input_ids).logits[:, :-1]
            labels = batch.labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))  # fmt: skip
            count += int((labels != -100).sum())
    return total / count


def test_pp2_matches_hf_with_uneven_split(tiny_hf: Path, tiny_shards: Path, mixed_tasks: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    eval_file = write_jsonl(tmp_path / "valid.jsonl", bundled_texts()[300:])
    evaluation = ["--evaluation-data", str(eval_file), "--evaluation-steps", "5", "--evaluation-num-batch", "2"]
    args = train_args(tiny_shards, mixed_tasks, ckpt, pp=2, dp=1, batch=4, micro=2, accum=1) + evaluation
    results = launch(args, 2, tmp_path)
    assert_all_ok(results)
    # 5 layers on 2 stages: the first stage holds one more
    assert "layers [0, 1, 2]" in results[0].output and "layers [3, 4]" in results[1].output
    state = compare_to_reference(tiny_hf, mixed_tasks, ckpt, per_step=4, tmp_path=tmp_path)

    # evaluation through the pipeline equals HF's loss of the final weights on the same batches
    valid = [r for r in read_metrics(ckpt) if "valid.loss" in r]
    assert [r["step"] for r in valid] == [5, 10]
    expected = reference_eval_loss(tmp_path / "hf", eval_file, per_batch=4, batches=2)
    assert valid[-1]["valid.loss"] == pytest.approx(expected, abs=LOSS_ATOL, rel=0)
    assert valid[-1]["valid.perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)

    # The step-5 checkpoint of this pp=2 run resumes under pp=1 and ends where the run ended.
    resume_elsewhere(tiny_shards, mixed_tasks, ckpt, state, tmp_path / "resumed")


def test_pp2_dp2_matches_hf_and_a_single_rank(
    tiny_hf: Path, tiny_shards: Path, mixed_tasks: str, tmp_path: Path
) -> None:
    # Global batch 8 either way: 2 per replica x 2 replicas x 2 accumulation rounds, or 8 at once.
    grid = tmp_path / "grid"
    grid_args = train_args(tiny_shards, mixed_tasks, grid / "ckpt", pp=2, dp=2, batch=2, micro=1, accum=2)
    grid_args += ["--loss-chunk-tokens", "8"]  # the chunked loss (auto leaves a tiny vocabulary whole)
    grid.mkdir()
    results = launch(grid_args, 4, grid)
    assert_all_ok(results)
    # what every rank would say alike is said once, or by one replica of each stage (ranks 0, 1);
    # what may differ between ranks (layers, device, threads; the optimizer state each holds) by each
    by = lambda text: [r.rank for r in results if text in r.output]  # noqa: E731
    assert by("checkpoints: one checkpoint folder shared by every rank") == [0]
    assert by("memory estimate:") == by("trainable of") == [0, 1]
    assert by("INFO [stage 0 | replica 1] run.entry: layers [") == [2]
    assert by("optimizer state held") == [0, 1, 2, 3]
    grid_state = compare_to_reference(tiny_hf, mixed_tasks, grid / "ckpt", per_step=8, tmp_path=grid)

    single = tmp_path / "single"
    single.mkdir()
    single_args = train_args(tiny_shards, mixed_tasks, single / "ckpt", pp=1, dp=1, batch=8, micro=4, accum=1)
    assert_all_ok(launch(single_args, 1, single))
    single_losses = [r["loss"] for r in read_metrics(single / "ckpt")]
    grid_losses = [r["loss"] for r in read_metrics(grid / "ckpt")]
    assert single_losses == pytest.approx(grid_losses, abs=LOSS_ATOL, rel=0)
    assert_same_state(load_hf_state(convert_to_hf(single / "ckpt", single / "hf")), grid_state)
