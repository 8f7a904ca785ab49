"""LoRA through the pipeline: PEFT's own model is the oracle, the adapters are all that moves."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convert.from_hf import convert_from_hf
from convert.tiny_model import build_tiny_model
from convert.to_hf import convert_to_hf
from modules import family_for, layer_part, load_config
from modules.lora import LoraSpec, adapter_part, hf_block_path
from pipeline.stage import Stage
from tests.helpers import (
    LOSS_ATOL,
    LR,
    SEED,
    SEQ,
    STEPS,
    WARMUP,
    assert_all_ok,
    bundled_texts,
    hf_reference_training,
    launch,
    load_hf_state,
    peft_reference_model,
    read_metrics,
    resume_elsewhere,
    saved_adapters,
    train_args,
)
from trainer.checkpoint import check_same_kind

RANK, ALPHA = 4, 8.0
ALL_LINEAR = {  # the default targets: every linear layer of a block
    "gptneox": ("dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"),
    "gptj": ("fc_in", "fc_out", "k_proj", "out_proj", "q_proj", "v_proj"),
    "llama": ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"),
    "gpt2": ("c_attn", "c_fc", "c_proj"),
}
LORA_FLAGS = ("--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--lora-dropout", "0")


def lora_stages(family: str, shards: Path, spec: LoraSpec, cut: int) -> list[Stage]:
    """Two stages of the sharded model split at layer ``cut``, base loaded, adapters added."""
    config = load_config(shards)
    layers = config.num_hidden_layers
    stages = [
        Stage(family_for(family), config, range(0, cut), is_first=True, is_last=False),
        Stage(family_for(family), config, range(cut, layers), is_first=False, is_last=True),
    ]
    for stage in stages:
        stage.load_parts(str(shards))
        stage.add_lora(spec, SEED)
    return stages


def copy_adapters_into_peft(stages: list[Stage], peft_model: torch.nn.Module, family: str) -> None:
    """Give PEFT's model exactly our adapters, through PEFT's own loader."""
    from peft import set_peft_model_state_dict

    state = {}
    for stage in stages:
        for part, module in stage.saved_parts().items():
            index = int(part.removeprefix(adapter_part("layer_")))
            for key, value in stage.saved_state(module).items():
                state[f"base_model.model.{hf_block_path(family_for(family), index)}.{key}"] = value
    result = set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys


@pytest.mark.parametrize(
    "family,targets",
    [("gptneox", ()), ("gptj", ()), ("llama", ()), ("llama", ("v_proj", "q_proj")), ("gpt2", ("all-linear",))],
)
def test_lora_stages_equal_peft_logits_and_train_adapters_only(family: str, targets: tuple, tmp_path: Path) -> None:
    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), family, num_layers=3, seed=1)
    shards = convert_from_hf(hf, tmp_path / "shards")
    stages = lora_stages(family, shards, LoraSpec(RANK, ALPHA, 0.0, targets), cut=1)
    spec = stages[0].lora
    assert spec.target_modules == (ALL_LINEAR[family] if targets in ((), ("all-linear",)) else tuple(sorted(targets)))
    # B starts at zero (the adapted model starts as the base); make it count for the comparison
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for stage in stages:
            for name, param in stage.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    reference = peft_reference_model(hf, spec, SEED).eval()
    copy_adapters_into_peft(stages, reference, family)
    config = load_config(shards)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for stage in stages:
        stage.eval()
    with torch.no_grad():
        ours = stages[1](stages[0](ids))
        torch.testing.assert_close(ours, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
    # the adapters move the logits away from the base model's
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa").eval()(ids).logits
    assert (ours - plain).abs().max() > 1e-3

    # one optimizer step: adapters move, every base weight stays bit for bit
    for stage in stages:
        stage.train()
    before = {(i, n): p.detach().clone() for i, s in enumerate(stages) for n, p in s.named_parameters()}
    trained = [p for s in stages for p in s.parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for s in stages for n, p in s.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    stages[1](stages[0](ids)).float().logsumexp(-1).mean().backward()
    optimizer.step()
    for (i, name), old in before.items():
        now = dict(stages[i].named_parameters())[name]
        assert torch.equal(now, old) != (".lora_" in name), name


@pytest.mark.parametrize("family", ["gptneox", "gptj", "llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_frozen_weights_in_half_precision_change_nothing_but_memory(family: str, dtype: torch.dtype) -> None:
    from convert.tiny_model import tiny_config

    config = tiny_config(family, 100, num_layers=2)
    config._attn_implementation = "sdpa"
    results = []
    for frozen in (None, dtype):
        stage = Stage(family_for(family), config, range(2), is_first=True, is_last=True)
        stage.init_parts(0.02, SEED)
        stage.add_lora(LoraSpec(RANK, ALPHA, 0.0), SEED, frozen_dtype=frozen)
        with torch.no_grad():
            for name, param in stage.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
        ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=dtype):
            logits = stage(ids)
        logits.float().logsumexp(-1).sum().backward()
        grads = {n: p.grad for n, p in stage.named_parameters() if p.requires_grad}
        assert all(g.dtype == torch.float32 for g in grads.values())  # adapters keep fp32 weights and grads
        results.append((logits.detach(), grads, sum(p.numel() * p.element_size() for p in stage.parameters())))
    (full_logits, full_grads, full_bytes), (half_logits, half_grads, half_bytes) = results
    assert torch.equal(full_logits, half_logits)
    assert full_grads.keys() == half_grads.keys() and all(torch.equal(full_grads[k], half_grads[k]) for k in full_grads)
    assert half_bytes < 0.8 * full_bytes


@pytest.fixture(scope="module")
def lora_run(tiny_hf: Path, tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pp=2 x dp=2 LoRA run of the tiny GPT-NeoX: 10 steps, checkpoints at 5 and 10."""
    tmp = tmp_path_factory.mktemp("lora_run")
    ckpt = tmp / "ckpt"
    args = train_args(tiny_shards, two_tasks, ckpt, pp=2, dp=2, batch=2, micro=1, accum=1)
    assert_all_ok(launch([*args, *LORA_FLAGS], 4, tmp))
    return ckpt


def compare_to_peft(
    hf: Path, tasks: str, ckpt: Path, packing: str | None = None
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Losses, gradient norms and final adapters of a finished LoRA run equal PEFT's in one
    process; the checkpoint holds adapters (and their AdamW moments) only. Returns the rows
    and the adapters."""
    spec = LoraSpec.read(ckpt / "checkpoint_10")[0]
    schedule = (SEQ, SEED, 4, STEPS, LR, WARMUP)
    losses, norms, adapters = hf_reference_training(hf, tasks, *schedule, lora=spec, packing=packing)
    rows = [r for r in read_metrics(ckpt) if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx(losses, abs=LOSS_ATOL, rel=0)
    assert losses[-1] < losses[0]
    assert [r["grad_norm"] for r in rows] == pytest.approx(norms, rel=1e-5)

    step_dir = ckpt / "checkpoint_10"
    assert not list(step_dir.glob("embs*")) and not list(step_dir.glob("layer_*")) and not list(step_dir.glob("lm_*"))
    ours = saved_adapters(step_dir)
    for i in range(load_config(step_dir).num_hidden_layers):
        moments = load_file(step_dir / f"optim_{adapter_part(layer_part(i))}.safetensors")
        assert moments and all(".lora_" in k for k in moments)
    assert ours.keys() == adapters.keys()
    for key, value in adapters.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0, msg=key)
    return rows, adapters


@pytest.mark.ranks
def test_lora_pipeline_matches_single_process_peft(lora_run: Path, tiny_hf: Path, two_tasks: str) -> None:
    spec = LoraSpec.read(lora_run / "checkpoint_10")[0]
    assert (spec.rank, spec.alpha, spec.dropout) == (RANK, ALPHA, 0.0)
    rows, adapters = compare_to_peft(tiny_hf, two_tasks, lora_run)

    # metrics: trainable parameters are the adapters; replicas exchange only their gradients
    trainable = sum(v.numel() for v in adapters.values())
    assert {r["trainable_params"] for r in rows} == {trainable}
    # each of the 2 stages all-reduces its adapters' fp32 gradients, the loss and a preemption
    # notice slot per replica (2); a 2-replica ring sends the whole buffer once per rank
    assert {r["dp_bytes"] for r in rows} == {(trainable + 2 * (1 + 2)) * 4}
    # (rank 4 on hidden 32 is ~12% of the model; on a 4096-wide model rank 8 would be ~0.3%)
    assert trainable < sum(p.numel() for p in load_file(tiny_hf / "model.safetensors").values()) / 5


@pytest.mark.ranks
@pytest.mark.parametrize("mode", ["1f1b", "zb1"])
def test_lora_tied_llama_1f1b_and_zb1_match_peft(mode: str, two_tasks: str, tmp_path: Path) -> None:
    """Tied embeddings stay frozen at both ends (no sum between them); chosen targets; under zb1
    only the adapters' weight gradients wait for W (the frozen base computes input gradients).
    On the concat stream (the stories run on across sequences), whose loss falls within the 10 steps."""
    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), "llama", num_layers=4, seed=1)
    shards = convert_from_hf(hf, tmp_path / "shards")
    ckpt = tmp_path / "ckpt"
    args = train_args(shards, two_tasks, ckpt, pp=2, dp=1, batch=4, micro=1, accum=1)
    flags = [*LORA_FLAGS, "--pp-mode", mode, "--lora-target-modules", "v_proj", "q_proj", "--packing", "concat"]
    assert_all_ok(launch([*args, *flags], 2, tmp_path))
    assert LoraSpec.read(ckpt / "checkpoint_10")[0].target_modules == ("q_proj", "v_proj")
    compare_to_peft(hf, two_tasks, ckpt, packing="concat")


@pytest.mark.ranks
def test_lora_export_adapter_and_merged_give_our_logits(lora_run: Path, tiny_hf: Path, tiny_shards: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    spec = LoraSpec.read(lora_run / "checkpoint_10")[0]
    stages = lora_stages("gptneox", tiny_shards, spec, cut=3)
    for stage in stages:
        stage.load_saved(str(lora_run / "checkpoint_10"))
        stage.eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = stages[1](stages[0](ids))

    adapter_dir = convert_to_hf(lora_run, tmp_path / "adapter", lora_export="adapter", base_hf_name=str(tiny_hf))
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_hf, attn_implementation="sdpa")
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    # and on its own: the adapter folder names the HF base it was given
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(auto(input_ids=ids).logits, ours, atol=1e-5, rtol=0)

    merged_dir = convert_to_hf(lora_run, tmp_path / "merged")  # merged is the default
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-5, rtol=0)
    # merging changed exactly the adapted linear layers; everything else is the base, bit for bit
    merged_state = merged.state_dict()
    for key, value in base_before.items():
        adapted = any(f".{t}.weight" in key for t in spec.target_modules) and ".layers." in key
        assert torch.equal(merged_state[key], value) != adapted, key


@pytest.mark.ranks
def test_lora_resume_in_the_same_topology_is_bit_exact(
    lora_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(lora_run / "checkpoint_5", ckpt / "checkpoint_5")
    (ckpt / "latest").write_text("5\n")
    args = train_args(tiny_shards, two_tasks, ckpt, pp=2, dp=2, batch=2, micro=1, accum=1)
    assert_all_ok(launch([*args, *LORA_FLAGS], 4, tmp_path))
    resumed = {r["step"]: r["loss"] for r in read_metrics(ckpt) if "loss" in r}
    assert resumed == {r["step"]: r["loss"] for r in read_metrics(lora_run) if "loss" in r and r["step"] > 5}
    names = [p.name for p in (lora_run / "checkpoint_10").glob("*lora_layer_*.safetensors")]
    assert len(names) == 2 * 5  # adapters and their AdamW state, for each of the 5 layers
    for name in names:
        ours, theirs = load_file(ckpt / "checkpoint_10" / name), load_file(lora_run / "checkpoint_10" / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), name


@pytest.mark.ranks
def test_lora_resumes_exactly_in_another_topology(
    lora_run: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    final = load_hf_state(convert_to_hf(lora_run, tmp_path / "final"))
    resume_elsewhere(tiny_shards, two_tasks, lora_run, final, tmp_path / "resumed", extra=LORA_FLAGS)


@pytest.mark.ranks
def test_lora_checkpoint_refuses_other_flags(lora_run: Path, tiny_shards: Path, two_tasks: str,
                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    ckpt = tmp_path / "ckpt"
    shutil.copytree(lora_run / "checkpoint_5", ckpt / "checkpoint_5")
    (ckpt / "latest").write_text("5\n")
    args = train_args(tiny_shards, two_tasks, ckpt, pp=1, dp=1, batch=4, micro=4, accum=1)
    for extra, expected in (
        ((), "holds LoRA adapters (rank 4); pass the same --lora-* flags"),
        (("--lora-rank", "8", "--lora-dropout", "0"), "pass the same --lora-* flags or choose a new --checkpoint-path"),
    ):
        (result,) = launch([*args, *extra], 1, tmp_path)
        assert result.returncode != 0 and expected in result.output, result.output[-2000:]
    assert (ckpt / "latest").read_text() == "5\n"  # nothing was overwritten

    # the same adapters over another base folder: allowed (paths differ between nodes), but said
    spec = LoraSpec.read(ckpt / "checkpoint_5")[0]
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        check_same_kind(ckpt / "checkpoint_5", spec, str(tiny_shards))
        assert not caplog.records
        check_same_kind(ckpt / "checkpoint_5", spec, str(tmp_path / "elsewhere"))
    assert "they must be the same model" in caplog.text


@pytest.mark.ranks
def test_lora_bad_input_is_one_clear_line(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    from trainer.cli import config_from_args, parse_args

    base = ["--rank", "0", "--model-name", str(tiny_shards), "--task-name", two_tasks]
    with pytest.raises(ValueError, match="need --lora-rank"):
        config_from_args(parse_args([*base, "--lora-alpha", "16"]))
    with pytest.raises(ValueError, match="--lora-dropout must lie in"):
        config_from_args(parse_args([*base, "--lora-rank", "4", "--lora-dropout", "1.5"]))
    with pytest.raises(ValueError, match="LoRA adapts pretrained weights"):
        config_from_args(parse_args([*base, "--lora-rank", "4", "--load-pretrained-model", "false"]))
    cfg = config_from_args(parse_args([*base, "--lora-rank", "4", "--lora-target-modules", "dense,query_key_value"]))
    assert cfg.lora == LoraSpec(4, 8.0, 0.05, ("dense", "query_key_value"))  # alpha defaults to 2 x rank

    # an unknown layer name fails on every rank before training, naming the valid ones
    args = train_args(tiny_shards, two_tasks, tmp_path / "ckpt", pp=2, dp=1, batch=2, micro=1, accum=1)
    results = launch([*args, "--lora-rank", "4", "--lora-target-modules", "q_proj"], 2, tmp_path, timeout=120)
    for r in results:
        assert r.returncode != 0
        assert "--lora-target-modules q_proj: no such linear layer in a gptneox block; choose from dense" in r.output

    # a full-weight checkpoint has no adapters to export
    with pytest.raises(ValueError, match="holds full weights, not LoRA adapters"):
        convert_to_hf(tiny_shards, tmp_path / "out", lora_export="adapter")


def same_length_prompts(tokenizer: object, count: int, tokens: int) -> list[str]:
    """Prompts from the bundled texts that are each ``tokens`` tokens long (no left padding: HF's
    ``generate`` of each alone computes exactly what a micro-batch of them does)."""
    found = []
    for text in bundled_texts():
        prompt = tokenizer.decode(tokenizer(text)["input_ids"][:tokens])
        if len(tokenizer(prompt)["input_ids"]) == tokens and prompt not in found:
            found.append(prompt)
    assert len(found) >= count
    return found[:count]


@pytest.mark.ranks
def test_lora_checkpoint_sampled_at_pp2_dp2_equals_peft_generate(
    lora_run: Path, tiny_hf: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    """--sample-prompts over the run's own launch: each replica's pipeline generates its share of
    the prompts with the latest checkpoint's adapters on, as PEFT's model does in one process."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    prompts = same_length_prompts(tokenizer, 5, 6)
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "samples" / "out.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    args = ["--model-name", str(tiny_shards), "--checkpoint-path", str(lora_run), *LORA_FLAGS,
            "--pipeline-group-size", "2", "--data-group-size", "2", "--seq-length", "32", "--micro-batch-size", "2",
            "--batch-size", "2", "--sample-prompts", str(prompts_file), "--sample-output", str(out),
            "--temperature", "0", "--max-completion-length", "12"]  # fmt: skip
    results = launch(args, 4, tmp_path)
    assert_all_ok(results)
    assert f"sampling checkpoint 10 of {lora_run}: 5 prompts" in results[0].output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["line"], r["prompt"], r["id"]) for r in rows] == [(i + 1, p, i) for i, p in enumerate(prompts)]

    spec = LoraSpec.read(lora_run / "checkpoint_10")[0]
    stages = lora_stages("gptneox", tiny_shards, spec, cut=2)
    for stage in stages:
        stage.load_saved(str(lora_run / "checkpoint_10"))
    reference = peft_reference_model(tiny_hf, spec, SEED).eval()
    copy_adapters_into_peft(stages, reference, "gptneox")
    eos = tokenizer.eos_token_id
    for row, prompt in zip(rows, prompts, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        want = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        want = want[0, ids.shape[1] :].tolist()
        assert row["completion_ids"] == want[: want.index(eos) + 1 if eos in want else None]
        assert row["finish_reason"] == ("stop" if eos in want else "length")
        assert row["completion"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
