"""A checkpoint folder holds one run: a relaunch with another model, tokenizer, data mix or
training settings is refused in one line naming what differs and the ways out; a changed
learning-rate schedule resumes with a warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from convert.from_hf import convert_from_hf
from convert.tiny_model import build_tiny_model
from tests.helpers import SEED, SEQ, assert_all_ok, bundled_texts, launch, read_metrics, train_args
from trainer.cli import config_from_args, parse_args
from trainer.config import RunConfig
from trainer.identity import RunIdentity, check_resume, schedule_of


def accepts_or_refuses(cfg: RunConfig, state: dict) -> None:
    check_resume(cfg, state, 5, RunIdentity.of(cfg))


def config(shards: Path, tasks: str, ckpt: Path, *extra: str) -> RunConfig:
    args = train_args(shards, tasks, ckpt, pp=1, dp=1, batch=4, micro=4, accum=1)
    return config_from_args(parse_args([*args, "--rank", "0", *extra]))


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of the same family and shapes as tiny_shards, other weights (another seed)."""
    root = tmp_path_factory.mktemp("other_model")
    hf = build_tiny_model(root / "hf", bundled_texts(), "gptneox", num_layers=5, seed=3)
    return convert_from_hf(hf, root / "shards")


def test_identity_is_by_content_and_each_difference_is_named(
    tiny_shards: Path, other_shards: Path, two_tasks: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    run = config(tiny_shards, two_tasks, ckpt)
    state = {"run": RunIdentity.of(run).to_json(), "schedule": schedule_of(run)}
    copy = shutil.copytree(tiny_shards, tmp_path / "elsewhere" / "shards")
    accepts_or_refuses(config(copy, two_tasks, ckpt), state)  # the same model in another folder: the same run
    # converted apart: another library version in config.json, other paths and flags in tokenizer_config.json
    for name, extra in (("config.json", {"transformers_version": "9.9.9"}),
                        ("tokenizer_config.json", {"is_local": False, "name_or_path": "some/hub-id"})):  # fmt: skip
        path = copy / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=1))
    accepts_or_refuses(config(copy, two_tasks, ckpt), state)
    accepts_or_refuses(run, {"step": 5})  # a checkpoint from before identities: nothing to compare

    first, second = two_tasks.split(",")
    for extra, what in (
        ((), "model"),
        (("--seq-length", "16"), "seq_length"),
        (("--seed", "1"), "seed"),
    ):
        shards = other_shards if what == "model" else tiny_shards
        with pytest.raises(ValueError) as refused:
            accepts_or_refuses(config(shards, two_tasks, ckpt, *extra), state)
        message = str(refused.value)
        assert "\n" not in message and f"{ckpt} holds checkpoints of another run ({what}" in message
        assert f"--model-name {ckpt / 'checkpoint_5'} (weights loaded) and a new --checkpoint-path" in message
    reweighted = f"{first.rsplit(':', 1)[0]}:0.5,{second.rsplit(':', 1)[0]}:0.5"
    with pytest.raises(ValueError, match=r"another run \(data "):
        accepts_or_refuses(config(tiny_shards, reweighted, ckpt), state)

    with caplog.at_level(logging.WARNING, logger="trainer.identity"):
        accepts_or_refuses(config(tiny_shards, two_tasks, ckpt, "--total-steps", "20", "--lr", "1e-3"), state)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "total_steps 10 -> 20" in warning and "lr 0.002 -> 0.001" in warning and "step 5" in warning


@pytest.mark.ranks
def test_a_relaunch_with_another_model_is_refused_before_training(
    tiny_shards: Path, other_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Through the trainer: run A checkpoints at step 5; B, with another model of the same
    shapes in A's folder, stops at start-up with the reason and leaves A's checkpoint as it was;
    C, started from A's checkpoint folder as its model, trains A's step-5 weights from step 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.to_hf import convert_to_hf
    from data.stream import TokenStream, parse_task_names

    ckpt = tmp_path / "ckpt"
    args = train_args(tiny_shards, two_tasks, ckpt, pp=1, dp=1, batch=4, micro=4, accum=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert_all_ok(launch([*args, "--total-steps", "5"], 1, tmp_path / "a"))
    before = {p.name: p.read_bytes() for p in (ckpt / "checkpoint_5").iterdir()}
    other = train_args(other_shards, two_tasks, ckpt, pp=1, dp=1, batch=4, micro=4, accum=1)
    (result,) = launch([*other, "--total-steps", "8"], 1, tmp_path / "b", timeout=120)
    assert result.returncode == 1 and "holds checkpoints of another run (model: not the one it started" in result.output
    assert "resumed from step" not in result.output
    assert {p.name: p.read_bytes() for p in (ckpt / "checkpoint_5").iterdir()} == before
    assert [r["step"] for r in read_metrics(ckpt) if "loss" in r] == [1, 2, 3, 4, 5]

    # the way out it names: a new run from A's step-5 weights starts at step 1 from exactly them
    new = train_args(ckpt / "checkpoint_5", two_tasks, tmp_path / "new", pp=1, dp=1, batch=4, micro=4, accum=1)
    (tmp_path / "c").mkdir()
    assert_all_ok(launch([*new, "--total-steps", "1", "--warmup-steps", "0"], 1, tmp_path / "c"))
    (row,) = [r for r in read_metrics(tmp_path / "new") if "loss" in r]
    model = AutoModelForCausalLM.from_pretrained(convert_to_hf(ckpt, tmp_path / "a_hf"))  # A's latest: step 5
    batch = TokenStream(parse_task_names(two_tasks), AutoTokenizer.from_pretrained(tiny_shards), SEQ, SEED).next_batch(
        4
    )
    with torch.no_grad():
        first = model(input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.positions(), use_cache=False)
    assert row["step"] == 1 and row["loss"] == pytest.approx(first.loss.item(), abs=1e-5)
