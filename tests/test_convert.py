"""Converters and stages against Hugging Face's own model: exact weights, same logits."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convert.from_hf import convert_from_hf
from convert.to_hf import convert_to_hf
from modules import EMBEDDING_PART, HEAD_PART, KeyRule, family_for, layer_part, load_config
from modules.layout import copy_model_files, layer_indices, load_part
from pipeline.stage import Stage

NUM_LAYERS = 5  # the tiny_hf fixture
LOGITS_ATOL = 1e-5


def hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def all_parts() -> list[str]:
    return [EMBEDDING_PART, *(layer_part(i) for i in range(NUM_LAYERS)), HEAD_PART]


def sample_ids(vocab_size: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def assert_same_weights(converted: Path, original: Path) -> None:
    got = hf_model(converted).state_dict()
    want = hf_model(original).state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), f"{key} differs after conversion"


def test_round_trip_is_exact(tiny_hf: Path, tmp_path: Path) -> None:
    shards = convert_from_hf(tiny_hf, tmp_path / "shards")
    assert layer_indices(shards) == list(range(NUM_LAYERS))
    back = convert_to_hf(shards, tmp_path / "hf")

    original, converted = hf_model(tiny_hf), hf_model(back)
    want, got = original.state_dict(), converted.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{key} differs after the round trip"

    ids = sample_ids(original.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, original(input_ids=ids).logits)


def test_round_trip_keeps_tokenizer(tiny_hf: Path, tiny_shards: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    back = convert_to_hf(tiny_shards, tmp_path / "hf")
    text = "Cleo carried a small boat and gave it to Gus."
    assert (
        AutoTokenizer.from_pretrained(back)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(tiny_hf)(text)["input_ids"]
    )


def build_stage(shards: Path, layers: range, is_first: bool, is_last: bool) -> Stage:
    config = load_config(shards)
    stage = Stage(family_for(config.model_type), config, layers, is_first, is_last)
    stage.load_parts(str(shards))
    return stage.eval()


@pytest.mark.parametrize("split", [[range(0, 3), range(3, 5)], [range(0, 5)], [range(0, 1), range(1, 4), range(4, 5)]])
def test_chained_stages_match_hf_logits(tiny_hf: Path, tiny_shards: Path, split: list[range]) -> None:
    stages = [build_stage(tiny_shards, r, i == 0, i == len(split) - 1) for i, r in enumerate(split)]
    reference = hf_model(tiny_hf)
    ids = sample_ids(reference.config.vocab_size)
    with torch.no_grad():
        x = ids
        for stage in stages:
            x = stage(x)
        want = reference(input_ids=ids).logits
    assert x.shape == want.shape == (*ids.shape, reference.config.vocab_size)
    torch.testing.assert_close(x, want, atol=LOGITS_ATOL, rtol=0)


def test_stage_holds_exactly_its_parts(tiny_shards: Path) -> None:
    first = build_stage(tiny_shards, range(0, 3), True, False)
    last = build_stage(tiny_shards, range(3, 5), False, True)
    assert list(first.parts()) == [EMBEDDING_PART, "layer_0", "layer_1", "layer_2"]
    assert list(last.parts()) == ["layer_3", "layer_4", HEAD_PART]
    # the stage's tensors are the file's tensors, not a random init
    for stage in (first, last):
        for part, module in stage.parts().items():
            stored = load_file(str(tiny_shards / f"{part}.safetensors"))
            state = module.state_dict()
            assert state.keys() == stored.keys(), part
            for key, value in stored.items():
                assert torch.equal(state[key], value), f"{part}/{key}"


def write_legacy(shards: Path, target: Path) -> Path:
    target.mkdir()
    copy_model_files(shards, target)
    legacy_names = {EMBEDDING_PART: "pytorch_embs.pt", HEAD_PART: "pytorch_lm_head.pt"}
    for part in all_parts():
        name = legacy_names.get(part, f"pytorch_{part.removeprefix('layer_')}.pt")
        torch.save(load_file(str(shards / f"{part}.safetensors")), target / name)
    return target


def test_legacy_pt_layout_converts_exactly(tiny_hf: Path, tiny_shards: Path, tmp_path: Path) -> None:
    legacy = write_legacy(tiny_shards, tmp_path / "legacy")
    assert not list(legacy.glob("*.safetensors"))
    assert layer_indices(legacy) == list(range(NUM_LAYERS))
    assert_same_weights(convert_to_hf(legacy, tmp_path / "hf"), tiny_hf)


def test_legacy_pt_layout_loads_into_stages(tiny_hf: Path, tiny_shards: Path, tmp_path: Path) -> None:
    legacy = write_legacy(tiny_shards, tmp_path / "legacy")
    stages = [build_stage(legacy, range(0, 3), True, False), build_stage(legacy, range(3, 5), False, True)]
    reference = hf_model(tiny_hf)
    ids = sample_ids(reference.config.vocab_size)
    with torch.no_grad():
        logits = stages[1](stages[0](ids))
        torch.testing.assert_close(logits, reference(input_ids=ids).logits, atol=LOGITS_ATOL, rtol=0)


def test_to_hf_reads_the_latest_checkpoint_of_a_root(tiny_hf: Path, tiny_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_shards, root / "checkpoint_3")
    # A newer, unfinished checkpoint that `latest` does not name yet: it must be ignored.
    newer = shutil.copytree(tiny_shards, root / "checkpoint_5")
    embs = load_file(str(newer / "embs.safetensors"))
    torch.save({k: v + 1.0 for k, v in embs.items()}, newer / "pytorch_embs.pt")
    (newer / "embs.safetensors").unlink()
    (root / "latest").write_text("3\n")

    assert_same_weights(convert_to_hf(root, tmp_path / "hf"), tiny_hf)
    # and a checkpoint_<step> directory itself works as well
    assert_same_weights(convert_to_hf(root / "checkpoint_3", tmp_path / "hf3"), tiny_hf)


def test_from_hf_refuses_a_non_empty_save_dir(tiny_hf: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "taken"
    save_dir.mkdir()
    (save_dir / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--save-dir"):
        convert_from_hf(tiny_hf, save_dir)
    assert [p.name for p in save_dir.iterdir()] == ["notes.txt"]
    assert (save_dir / "notes.txt").read_text() == "keep me"


def test_from_hf_cli_exits_with_the_reason(tiny_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from convert.from_hf import main

    save_dir = tmp_path / "taken"
    save_dir.mkdir()
    (save_dir / "x").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["--model-name", str(tiny_hf), "--save-dir", str(save_dir)])
    assert "not empty" in str(exc.value.code) and str(save_dir) in str(exc.value.code)
    assert [p.name for p in save_dir.iterdir()] == ["x"]


def test_to_hf_refuses_a_non_empty_save_path(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(FileExistsError, match="--save-path"):
        convert_to_hf(tiny_shards, out)
    assert [p.name for p in out.iterdir()] == ["x"]


def test_to_hf_names_a_missing_layer(tiny_shards: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_shards, tmp_path / "broken")
    (broken / "layer_3.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as exc:
        convert_to_hf(broken, out)
    message = str(exc.value)
    assert "[0, 1, 2, 4]" in message and str(NUM_LAYERS) in message and "incomplete" in message
    assert not out.exists() or not any(out.iterdir())


def test_to_hf_names_a_missing_last_layer(tiny_shards: Path, tmp_path: Path) -> None:
    # the last layer missing: the files alone look like a complete 4-layer model
    broken = shutil.copytree(tiny_shards, tmp_path / "broken")
    (broken / "layer_4.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"\[0, 1, 2, 3\]"):
        convert_to_hf(broken, tmp_path / "out")


def test_to_hf_names_a_missing_embedding(tiny_shards: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_shards, tmp_path / "broken")
    (broken / "embs.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"embs\.safetensors"):
        convert_to_hf(broken, tmp_path / "out")


def test_to_hf_refuses_a_directory_without_config(tiny_shards: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_shards, tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        convert_to_hf(broken, tmp_path / "out")


def test_key_map_inverts_on_every_hf_key(tiny_hf: Path, tiny_shards: Path) -> None:
    family = family_for("gpt_neox")
    keys = list(hf_model(tiny_hf).state_dict())
    mapped = {key: family.hf_to_shard(key) for key in keys}
    for key, (part, local) in mapped.items():
        assert family.shard_to_hf(part, local) == key
    assert len(set(mapped.values())) == len(keys)  # no two HF weights share a shard slot
    # and the map is the one the shard files were written with
    by_part: dict[str, set[str]] = {}
    for part, local in mapped.values():
        by_part.setdefault(part, set()).add(local)
    assert sorted(by_part) == sorted(all_parts())
    for part, locals_ in by_part.items():
        assert set(load_part(tiny_shards, part)) == locals_, part


@pytest.mark.parametrize(
    ("hf_key", "shard"),
    [
        ("gpt_neox.embed_in.weight", ("embs", "embed_in.weight")),
        ("gpt_neox.layers.12.attention.dense.weight", ("layer_12", "attention.dense.weight")),
        ("gpt_neox.layers.1.mlp.dense_4h_to_h.bias", ("layer_1", "mlp.dense_4h_to_h.bias")),
        ("gpt_neox.final_layer_norm.bias", ("lm_head", "final_layer_norm.bias")),
        ("lm_head.weight", ("lm_head", "embed_out.weight")),
    ],
)
def test_key_rules_name_the_established_shard_keys(hf_key: str, shard: tuple[str, str]) -> None:
    family = family_for("gptneox")
    assert family.hf_to_shard(hf_key) == shard
    assert family.shard_to_hf(*shard) == hf_key


def test_the_most_specific_rule_of_a_part_wins() -> None:
    # A head part holding both an un-prefixed output weight and a prefixed norm (GPT-2 style):
    # the norm must not be read as "lm_head.ln_f.weight", whichever order the rules are listed in.
    rules = (
        KeyRule(hf="lm_head.", part=HEAD_PART, local=""),
        KeyRule(hf="transformer.ln_f.", part=HEAD_PART, local="ln_f."),
        KeyRule(hf="transformer.h.{layer}.", part="layer_{layer}"),
    )
    for ordered in (rules, rules[::-1]):
        family = dataclasses.replace(family_for("gptneox"), key_rules=ordered)
        for hf_key in ("lm_head.weight", "transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.10.x.y"):
            assert family.shard_to_hf(*family.hf_to_shard(hf_key)) == hf_key
        assert family.hf_to_shard("transformer.ln_f.weight") == (HEAD_PART, "ln_f.weight")


def test_unknown_keys_are_refused() -> None:
    family = family_for("gptneox")
    with pytest.raises(KeyError, match="no shard for HF weight 'transformer"):
        family.hf_to_shard("transformer.h.0.attn.c_attn.weight")
    with pytest.raises(KeyError, match="'bogus'"):
        family.shard_to_hf("bogus", "weight")


# -- reward models: HF's sequence classifiers ----------------------------------------------------


def hf_classifier(lm: Path, folder: Path) -> Path:
    """HF's one-label sequence classifier of the causal LM ``lm`` (its score head random), saved."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm)
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1, pad_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["gptneox", "llama"])  # untied, tied
def test_an_hf_reward_model_converts_scores_as_hf_and_exports_back_exactly(
    tiny_hf: Path, tmp_path: Path, family: str
) -> None:
    from transformers import AutoModelForSequenceClassification

    from convert.tiny_model import build_tiny_model
    from modules import SCORE_PART
    from objectives.reward import Reward, last_tokens
    from tests.helpers import bundled_texts

    lm = tiny_hf if family == "gptneox" else build_tiny_model(tmp_path / "lm", bundled_texts()[:200], family, 2)
    original = hf_classifier(lm, tmp_path / "rm")
    shards = convert_from_hf(original, tmp_path / "shards")
    assert sorted(load_file(shards / f"{SCORE_PART}.safetensors")) == ["weight"]

    # our stages score a batch as HF's classifier does, pooled where it pools
    config = load_config(shards)
    family = family_for(config.model_type)
    stage = Stage(family, config, range(config.num_hidden_layers), True, True, **Reward().stage_options())
    stage.load_parts(str(shards))
    stage.project_logits = False
    ids = sample_ids(config.vocab_size)
    ids[0, -5:] = config.pad_token_id  # a padded sequence
    hf = AutoModelForSequenceClassification.from_pretrained(original, attn_implementation="sdpa").eval()
    with torch.no_grad():
        ours = stage.score(stage(ids)[torch.arange(2), last_tokens(ids, config.pad_token_id)]).squeeze(-1)
        torch.testing.assert_close(ours, hf(input_ids=ids).logits.squeeze(-1), atol=LOGITS_ATOL, rtol=0)

    # and it exports back to the same classifier, bit for bit
    exported = convert_to_hf(shards, tmp_path / "back")
    again = AutoModelForSequenceClassification.from_pretrained(exported).state_dict()
    want = AutoModelForSequenceClassification.from_pretrained(original).state_dict()
    assert again.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(again[key], value), key


def test_a_classifier_of_several_labels_and_an_lm_objective_on_a_reward_model_are_refused(
    tiny_hf: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    from trainer.cli import config_from_args, parse_args
    from trainer.startup import plan_stage

    two = tmp_path / "two"
    AutoModelForSequenceClassification.from_pretrained(tiny_hf, num_labels=2).save_pretrained(two)
    shutil.copy(tiny_hf / "tokenizer.json", two)
    with pytest.raises(ValueError, match="has 2 labels; a reward model scores with one"):
        convert_from_hf(two, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    shards = convert_from_hf(hf_classifier(tiny_hf, tmp_path / "rm"), tmp_path / "shards")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b"}\n')
    args = ["--rank", "0", "--model-name", str(shards), "--task-name", str(data)]
    with pytest.raises(ValueError, match=r"is a reward model .* train it with --objective reward"):
        plan_stage(config_from_args(parse_args(args)))
