"""GPT-J, LLaMA (GQA, scaled RoPE, tied embeddings) and GPT-2 through the same pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convert.from_hf import convert_from_hf
from convert.tiny_model import build_tiny_model
from convert.to_hf import convert_to_hf
from modules import family_for, load_config
from pipeline.stage import Stage
from tests.helpers import (
    SEQ,
    assert_all_ok,
    bundled_texts,
    compare_to_reference,
    launch,
    read_metrics,
    resume_elsewhere,
    train_args,
)

FAMILIES = ("gptj", "llama", "gpt2")


def tiny_converted(root: Path, family: str) -> tuple[Path, Path]:
    """(HF folder, shards) of a tiny 4-layer model of ``family`` under ``root``."""
    hf = build_tiny_model(root / "hf", bundled_texts(), family, num_layers=4, seed=1)
    return hf, convert_from_hf(hf, root / "shards")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(family, HF folder, shards) of a tiny 4-layer model of each family."""
    return request.param, *tiny_converted(tmp_path_factory.mktemp(request.param), request.param)


def test_chained_stages_and_round_trip_equal_hf(family_model: tuple[str, Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    family, hf, shards = family_model
    config = load_config(shards)
    assert family_for(config.model_type).name == family  # detected from config.json
    reference = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa").eval()
    first = Stage(family_for(family), config, range(0, 1), is_first=True, is_last=False)
    last = Stage(family_for(family), config, range(1, 4), is_first=False, is_last=True)
    for stage in (first, last):
        stage.load_parts(str(shards))
        stage.eval()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(last(first(ids)), reference(ids).logits, atol=1e-5, rtol=0)

    out = convert_to_hf(shards, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = reference.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    written = load_file(out / "model.safetensors")
    # tied: one tensor on disk, as HF writes it (our shards hold a copy at each end)
    assert ("lm_head.weight" in written) != bool(config.tie_word_embeddings)


def test_pp2_matches_hf(family_model: tuple[str, Path, Path], two_tasks: str, tmp_path: Path) -> None:
    family, hf, shards = family_model
    ckpt = tmp_path / "ckpt"
    assert_all_ok(launch(train_args(shards, two_tasks, ckpt, pp=2, dp=1, batch=4, micro=2, accum=1), 2, tmp_path))
    state = compare_to_reference(hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)
    config = load_config(shards)
    activations = 2 * 2 * (2 * SEQ * config.hidden_size * 4)  # 2 micro-batches of 2 x SEQ, there and back
    tied = 2 * config.vocab_size * config.hidden_size * 4 if config.tie_word_embeddings else 0  # each end's copy
    assert {r["comm_bytes"] for r in read_metrics(ckpt) if "loss" in r} == {activations + tied}
    if family in ("llama", "gpt2"):  # tied: the two stages' copies stayed one tensor
        embedding = load_file(ckpt / "checkpoint_10" / "embs.safetensors")
        head = load_file(ckpt / "checkpoint_10" / "lm_head.safetensors")
        assert torch.equal(
            embedding["embed_tokens.weight" if family == "llama" else "wte.weight"], head["lm_head.weight"]
        )
    if family == "llama":  # a pp=2 checkpoint of a tied model resumes in one process, where both ends are one tensor
        resume_elsewhere(shards, two_tasks, ckpt, state, tmp_path / "resumed")


def test_llama_tied_pp2_dp2_matches_hf(
    two_tasks: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    hf, shards = tiny_converted(tmp_path_factory.mktemp("llama_grid"), "llama")
    ckpt = tmp_path / "ckpt"
    args = train_args(shards, two_tasks, ckpt, pp=2, dp=2, batch=2, micro=1, accum=1)
    # the chunked loss through a tied output weight (auto leaves a tiny vocabulary whole)
    assert_all_ok(launch([*args, "--loss-chunk-tokens", "8"], 4, tmp_path))
    compare_to_reference(hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)


def test_gpt2_zero_bubble_with_accumulation_matches_hf(
    two_tasks: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """zb1 defers GPT-2's Conv1D weight gradients and the head's (the tied copy, summed with the
    embedding's after every W ran), over two accumulation rounds in one pipeline pass."""
    hf, shards = tiny_converted(tmp_path_factory.mktemp("gpt2_zb1"), "gpt2")
    ckpt = tmp_path / "ckpt"
    args = train_args(shards, two_tasks, ckpt, pp=2, dp=1, batch=2, micro=1, accum=2)
    assert_all_ok(launch([*args, "--pp-mode", "zb1"], 2, tmp_path))
    compare_to_reference(hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)


@pytest.mark.parametrize("family", ["gptneox", "llama", "gpt2"])
def test_random_init_ignores_the_split_and_ties_both_ends(family: str) -> None:
    from convert.tiny_model import tiny_config

    config = tiny_config(family, 100, num_layers=4)
    config._attn_implementation = "sdpa"
    spec = family_for(family)
    split = [Stage(spec, config, range(0, 1), True, False), Stage(spec, config, range(1, 4), False, True)]
    whole = Stage(spec, config, range(0, 4), True, True)
    for stage in (*split, whole):
        stage.init_parts(0.02, seed=5)
    pieces = {**split[0].state_dict(), **split[1].state_dict()}
    assert pieces.keys() == whole.state_dict().keys()
    assert all(torch.equal(pieces[k], v) for k, v in whole.state_dict().items())
    if config.tie_word_embeddings:
        embedding_key, head_key = spec.tied_keys
        assert torch.equal(split[0].embedding.get_parameter(embedding_key), split[1].head.get_parameter(head_key))
