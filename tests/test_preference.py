"""DPO through the pipeline equals DPO written from the paper's formula on HF's own model.

The oracle (``dpo_oracle``) trains HF's model in one process on the run's batches: each
sequence's log-probability from HF's logits, the reference from a frozen copy of the starting
model (LoRA: PEFT's model with its adapters off), TRL's loss and metrics written out here. The
pipeline (pp=2 x dp=2) must give the same loss, rewards and log-probs at every step, the same
evaluation rows, and the same final weights; its reference is computed once, stored, and read
back by a resume, which then goes on bit for bit.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convert.to_hf import convert_to_hf
from data.stream import IGNORE_INDEX, TokenStream, parse_task_names
from modules.lora import LoraSpec
from objectives.reference import REFERENCE_FILE
from pipeline.chain import exact_norm
from tests.helpers import (
    LOSS_ATOL,
    LR,
    SEED,
    SEQ,
    STEPS,
    WARMUP,
    _train_in_process,
    assert_all_ok,
    assert_same_state,
    launch,
    load_hf_state,
    peft_reference_model,
    read_metrics,
    saved_adapters,
)
from tests.preference_runs import BETA, LORA, PAIRS_PER_STEP, SIMPO_GAMMA, Run, dpo_args

pytestmark = pytest.mark.ranks  # every test here starts rank processes


ROW_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")  # fmt: skip


def sequence_logps(model: torch.nn.Module, batch: object) -> torch.Tensor:
    """Each sequence's summed log-probability of its scored tokens, from HF's logits."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    picked = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (picked * (labels != IGNORE_INDEX)).sum(-1)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean DPO loss of a batch (chosen, rejected alternating) and TRL's metrics of it."""
    chosen, rejected = BETA * (policy[0::2] - reference[0::2]), BETA * (policy[1::2] - reference[1::2])
    return pair_terms(-F.logsigmoid(chosen - rejected).mean(), chosen, rejected, policy)


def simpo_terms(model: torch.nn.Module, batch: object) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO's mean loss of a batch from the paper's formula: each response's mean log-prob."""
    policy = sequence_logps(model, batch) / (batch.labels[:, 1:] != IGNORE_INDEX).sum(1)
    chosen, rejected = BETA * policy[0::2], BETA * policy[1::2]
    return pair_terms(-F.logsigmoid(chosen - rejected - SIMPO_GAMMA).mean(), chosen, rejected, policy)


def pair_terms(
    loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, policy: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss`` with TRL's metrics of a batch: the rewards ``chosen`` and ``rejected``, the log-probs ``policy``."""
    metrics = {
        "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(), "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy[0::2].mean(), "logps/rejected": policy[1::2].mean(),
    }  # fmt: skip
    return loss, {k: v.item() for k, v in metrics.items()}


def train_on_pairs(model: torch.nn.Module, hf: Path, train: str, terms: Callable) -> list[dict]:
    """The oracle's loop over the run's batches of pairs: ``terms(batch)`` gives the mean loss
    and the metrics of a batch; returns each step's row, with the exact gradient norm."""
    rows: list[dict] = []

    def loss_of(batch: object) -> torch.Tensor:
        loss, metrics = terms(batch)
        rows.append({"loss": loss.item(), **metrics})
        return loss

    trained = [p for p in model.parameters() if p.requires_grad]

    def clip(limit: float) -> torch.Tensor:
        norm = exact_norm([p.grad for p in trained])  # the trainer reports the exact (float64) norm
        torch.nn.utils.clip_grad_norm_(trained, limit)
        return norm

    schedule = (hf, train, SEQ, SEED, 2 * PAIRS_PER_STEP, STEPS, LR, WARMUP, 1.0)
    _, norms = _train_in_process(trained, loss_of, clip, *schedule, packing="none", pairs=True)
    for row, norm in zip(rows, norms, strict=True):
        row["grad_norm"] = norm
    return rows


def simpo_oracle(hf: Path, train: str) -> list[dict]:
    """HF's model trained by SimPO in one process: each step's row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa")
    model.train()
    return train_on_pairs(model, hf, train, lambda batch: simpo_terms(model, batch))


def dpo_oracle(hf: Path, train: str, valid: str, lora: LoraSpec | None = None) -> tuple[list[dict], dict, dict]:
    """HF's model trained by DPO in one process: each step's row, the evaluation row after the
    last step (5 batches of PAIRS_PER_STEP pairs), and the final weights (LoRA: the adapters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if lora is None:
        model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa")
        frozen = copy.deepcopy(model).eval()
    else:
        model = peft_reference_model(hf, lora, SEED)
    model.train()

    def reference(batch: object) -> torch.Tensor:
        with torch.no_grad():
            if lora is None:
                return sequence_logps(frozen, batch)
            model.eval()
            with model.disable_adapter():
                values = sequence_logps(model, batch)
            model.train()
            return values

    rows = train_on_pairs(model, hf, train, lambda batch: dpo_terms(sequence_logps(model, batch), reference(batch)))

    from transformers import AutoTokenizer

    stream = TokenStream(parse_task_names(valid), AutoTokenizer.from_pretrained(hf), SEQ, SEED, packing="none",
                         pairs=True)  # fmt: skip
    model.eval()
    with torch.no_grad():
        batches = [stream.next_batch(2 * PAIRS_PER_STEP) for _ in range(5)]
        policy = torch.cat([sequence_logps(model, b) for b in batches])
        loss, metrics = dpo_terms(policy, torch.cat([reference(b) for b in batches]))
    evaluation = {"valid.loss": float(loss), **{f"valid.{k}": v for k, v in metrics.items()}}
    if lora is not None:
        from peft import get_peft_model_state_dict

        return rows, evaluation, {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return rows, evaluation, {k: v.detach().clone() for k, v in model.state_dict().items()}


def launch_logs(folder: Path) -> list[str]:
    return [path.read_text() for path in sorted(folder.glob("rank*.log"))]


def assert_rows_match(ours: list[dict], theirs: list[dict], keys: tuple[str, ...] = ROW_KEYS) -> None:
    assert len(ours) == len(theirs)
    for step, (mine, oracle) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key in keys:
            assert mine[key] == pytest.approx(oracle[key], abs=LOSS_ATOL, rel=1e-6), (step, key)


@pytest.fixture(scope="module")
def dpo_expected(tiny_hf: Path, pairs: tuple[str, str]) -> tuple[list[dict], dict, dict]:
    """The oracle's full fine-tuning by DPO: rows, evaluation row, final weights."""
    return dpo_oracle(tiny_hf, *pairs)


def test_dpo_pipeline_equals_the_formula_on_hf(dpo_run: Run, dpo_expected: tuple, tmp_path: Path) -> None:
    rows, evaluation, weights = dpo_expected
    metrics = read_metrics(dpo_run.ckpt)
    ours = [r for r in metrics if "loss" in r]
    assert_rows_match(ours, rows)
    assert [r["grad_norm"] for r in ours] == pytest.approx([r["grad_norm"] for r in rows], rel=1e-5)
    # step 1: the policy is the reference, so the loss is ln 2, yet its gradient is not zero
    assert ours[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert ours[0]["rewards/margins"] == 0.0 and ours[0]["grad_norm"] > 0.1
    assert ours[-1]["loss"] < 0.6 and ours[-1]["rewards/accuracies"] > 0.5  # it learns the preference
    (valid,) = [r for r in metrics if "valid.loss" in r]
    assert_rows_match([valid], [evaluation], keys=tuple(evaluation))
    assert_same_state(load_hf_state(convert_to_hf(dpo_run.ckpt, tmp_path / "hf")), weights)


def test_dpo_frozen_reference_equals_the_formula_and_is_in_the_memory_estimate(
    dpo_run: Run, dpo_frozen_chunked_run: Run, dpo_expected: tuple, tmp_path: Path
) -> None:
    """--dpo-reference frozen: each step's pairs through a frozen copy of the starting weights,
    no pass before training and no file; the same rows as the formula's, and the copy's bytes
    in each stage's start-up estimate. The loss is chunked (as ``auto`` chunks a real vocabulary):
    the copy's log-probs must come through the copy's own output layer, not the trained one."""
    ckpt, logs = dpo_frozen_chunked_run.ckpt, dpo_frozen_chunked_run.logs
    assert not (ckpt / REFERENCE_FILE).exists() and not any("reference log-probs" in r for r in logs)
    rows, evaluation, weights = dpo_expected
    metrics = read_metrics(ckpt)
    assert_rows_match([r for r in metrics if "loss" in r], rows)
    (valid,) = [r for r in metrics if "valid.loss" in r]
    assert_rows_match([valid], [evaluation], keys=tuple(evaluation))
    assert_same_state(load_hf_state(convert_to_hf(ckpt, tmp_path / "hf")), weights)
    # the start-up estimate counts each stage's weights twice (the copy), its gradients once
    for run, copies in ((logs, 2), (dpo_run.logs, 1)):
        estimates = [re.search(r"parameters (\S+) GB, gradients (\S+) GB", log) for log in run]
        assert len([e for e in estimates if e]) == 2  # one replica of each stage says it
        for parameters, gradients in (map(float, e.groups()) for e in estimates if e):
            assert parameters == pytest.approx(copies * gradients, rel=0.01)


def test_dpo_with_lora_uses_the_adapters_off_model_as_reference(
    tiny_hf: Path, pairs: tuple[str, str], dpo_lora_run: Run
) -> None:
    """--dpo-reference frozen under LoRA: each step's reference is the same stages with their
    adapters off (no copy of any weight)."""
    ckpt = dpo_lora_run.ckpt
    rows, evaluation, adapters = dpo_oracle(tiny_hf, *pairs, lora=LoraSpec.read(ckpt / "checkpoint_10")[0])
    metrics = read_metrics(ckpt)
    ours = [r for r in metrics if "loss" in r]
    assert_rows_match(ours, rows)
    assert ours[-1]["loss"] < ours[0]["loss"]
    (valid,) = [r for r in metrics if "valid.loss" in r]
    assert_rows_match([valid], [evaluation], keys=tuple(evaluation))
    assert_same_state(saved_adapters(ckpt / "checkpoint_10"), adapters)


def test_dpo_resume_reads_the_reference_and_goes_on_bit_for_bit(
    dpo_run: Run, tiny_shards: Path, pairs: tuple[str, str], tmp_path: Path
) -> None:
    dpo_run = dpo_run.ckpt
    ckpt = tmp_path / "ckpt"
    shutil.copytree(dpo_run / "checkpoint_5", ckpt / "checkpoint_5")
    shutil.copy(dpo_run / REFERENCE_FILE, ckpt / REFERENCE_FILE)
    (ckpt / "latest").write_text("5\n")
    results = launch(dpo_args(tiny_shards, pairs, ckpt), 4, tmp_path)
    assert_all_ok(results)
    said = [r.rank for r in results if "reference log-probs read from" in r.output]  # rank 0 says it for all
    assert said == [0] and not any("computed in" in r.output for r in results)
    resumed = [r for r in read_metrics(ckpt) if "loss" in r]
    original = [r for r in read_metrics(dpo_run) if "loss" in r][5:]
    for key in ROW_KEYS:
        assert [r[key] for r in resumed] == [r[key] for r in original], key
    assert (ckpt / REFERENCE_FILE).read_bytes() == (dpo_run / REFERENCE_FILE).read_bytes()

    # without its reference a resumed full fine-tuning run cannot rebuild it: one line, nothing lost
    (ckpt / REFERENCE_FILE).unlink()
    args = dpo_args(tiny_shards, pairs, ckpt, pp=1, dp=1)
    (result,) = launch(args, 1, tmp_path)
    assert result.returncode != 0
    assert f"{ckpt / REFERENCE_FILE} is missing or does not fit the data" in result.output
    assert (ckpt / "latest").read_text() == "10\n"


def test_simpo_needs_no_reference_and_equals_its_formula(tiny_hf: Path, pairs: tuple[str, str], simpo_run: Run) -> None:
    ckpt = simpo_run.ckpt
    assert not (ckpt / REFERENCE_FILE).exists() and not any("reference log-probs" in r for r in simpo_run.logs)
    ours = [r for r in read_metrics(ckpt) if "loss" in r]
    assert_rows_match(ours, simpo_oracle(tiny_hf, pairs[0]))
    assert ours[-1]["loss"] < ours[0]["loss"]


def test_dpo_lora_resume_without_its_reference_rebuilds_it_with_the_adapters_off(
    tiny_shards: Path, pairs: tuple[str, str], tmp_path: Path
) -> None:
    """A LoRA run still holds its reference (the base): a resume that lacks the file computes it
    again, adapters off, and goes on as the run did. With the adapters left on (trained for 5
    steps) the rebuilt reference, and so every later loss, would differ."""
    ckpt = tmp_path / "ckpt"
    assert_all_ok(launch([*dpo_args(tiny_shards, pairs, ckpt, pp=2, dp=1), *LORA], 2, tmp_path))
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt / "checkpoint_5", resumed / "checkpoint_5")
    (resumed / "latest").write_text("5\n")
    (result,) = launch([*dpo_args(tiny_shards, pairs, resumed, pp=1, dp=1), *LORA], 1, tmp_path)
    assert result.returncode == 0, result.output[-3000:]
    assert "reference log-probs of every pair computed" in result.output
    before = json.loads((ckpt / REFERENCE_FILE).read_text())["files"]
    after = json.loads((resumed / REFERENCE_FILE).read_text())["files"]
    assert [f["lines"] for f in after] == [f["lines"] for f in before]
    for mine, theirs in zip(after, before, strict=True):
        assert torch.tensor(mine["logps"]) == pytest.approx(torch.tensor(theirs["logps"]), abs=1e-4)
    original = [r for r in read_metrics(ckpt) if "loss" in r][5:]
    assert_rows_match([r for r in read_metrics(resumed) if "loss" in r], original)


# -- reward models --------------------------------------------------------------------------------


def hf_rewards(model: torch.nn.Module, batch: object) -> torch.Tensor:
    """HF's own scores of a batch's sequences (pooled where HF pools: the last token not padding)."""
    return model(input_ids=batch.input_ids, use_cache=False).logits.squeeze(-1).float()


def reward_terms(rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean pairwise loss of a batch (chosen, rejected alternating) and TRL's metrics of it."""
    chosen, rejected = rewards[0::2], rewards[1::2]
    loss = torch.log1p(torch.exp(rejected - chosen)).mean()  # ColossalAI's form of -log sigmoid(r_c - r_r)
    metrics = {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
               "mean_reward": rewards.mean()}  # fmt: skip
    return loss, {k: v.item() for k, v in metrics.items()}


def reward_oracle(hf: Path, train: str, valid: str) -> tuple[list[dict], dict, dict]:
    """HF's ForSequenceClassification model of the tiny LM (its score head started as the
    trainer starts it) trained on the pairwise loss in one process: rows, evaluation, weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from modules import SCORE_PART, part_generator

    tokenizer = AutoTokenizer.from_pretrained(hf)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1, pad_token_id=pad,
                                                               attn_implementation="sdpa")  # fmt: skip
    with torch.no_grad():
        shape = model.score.weight.shape
        model.score.weight.copy_(torch.randn(shape, generator=part_generator(SEED, SCORE_PART)) * 0.02)
    model.train()
    rows = train_on_pairs(model, hf, train, lambda batch: reward_terms(hf_rewards(model, batch)))
    model.eval()
    return rows, reward_evaluation(model, hf, valid), {k: v.detach().clone() for k, v in model.state_dict().items()}


def reward_evaluation(model: torch.nn.Module, hf: Path, valid: str) -> dict[str, float]:
    """The evaluation row of a run (5 batches of PAIRS_PER_STEP pairs), by HF's ``model``."""
    from transformers import AutoTokenizer

    stream = TokenStream(parse_task_names(valid), AutoTokenizer.from_pretrained(hf), SEQ, SEED, packing="none",
                         pairs=True)  # fmt: skip
    with torch.no_grad():
        rewards = torch.cat([hf_rewards(model, stream.next_batch(2 * PAIRS_PER_STEP)) for _ in range(5)])
    loss, metrics = reward_terms(rewards)
    return {"valid.loss": loss.item(), **{f"valid.{k}": v for k, v in metrics.items()}}


REWARD_KEYS = ("loss", "accuracy", "margin", "mean_reward", "grad_norm")


def test_reward_model_equals_hf_sequence_classifier_and_exports_to_it(
    tiny_hf: Path, tiny_shards: Path, pairs: tuple[str, str], tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    ckpt = tmp_path / "ckpt"
    args = [*dpo_args(tiny_shards, pairs, ckpt), "--pp-mode", "zb1"]
    args[args.index("dpo")] = "reward"
    del args[args.index("--dpo-beta") : args.index("--dpo-beta") + 2]
    assert_all_ok(launch(args, 4, tmp_path))
    rows, evaluation, weights = reward_oracle(tiny_hf, *pairs)
    metrics = read_metrics(ckpt)
    ours = [r for r in metrics if "loss" in r]
    assert_rows_match(ours, rows, REWARD_KEYS)
    assert ours[-1]["loss"] < ours[0]["loss"]
    (valid,) = [r for r in metrics if "valid.loss" in r]
    assert_rows_match([valid], [evaluation], keys=tuple(evaluation))

    # the export is HF's sequence classifier: its weights are the oracle's, and it scores the
    # evaluation pairs as the trainer did
    exported = AutoModelForSequenceClassification.from_pretrained(convert_to_hf(ckpt, tmp_path / "hf")).eval()
    assert type(exported).__name__ == "GPTNeoXForSequenceClassification" and exported.config.num_labels == 1
    assert_same_state(exported.state_dict(), weights)
    assert_rows_match([reward_evaluation(exported, tiny_hf, pairs[1])], [valid], keys=tuple(evaluation))
    # and it ranks the chosen response above the rejected on most training pairs
    from transformers import AutoTokenizer

    stream = TokenStream(parse_task_names(pairs[0]), AutoTokenizer.from_pretrained(tiny_hf), SEQ, SEED,
                         packing="none", pairs=True)  # fmt: skip
    with torch.no_grad():
        rewards = torch.cat([hf_rewards(exported, stream.next_batch(50)) for _ in range(3)])
    assert (rewards[0::2] > rewards[1::2]).float().mean() > 0.6


def test_lora_reward_model_resumes_elsewhere_and_exports_merged(
    tiny_hf: Path, tiny_shards: Path, pairs: tuple[str, str], tmp_path: Path
) -> None:
    """Under LoRA the score head trains whole beside the adapters and is saved with them; a
    resume in another topology goes on as the run did; the merged export scores as the trainer."""
    from transformers import AutoModelForSequenceClassification

    def reward_args(ckpt: Path, pp: int, dp: int) -> list[str]:
        args = [*dpo_args(tiny_shards, pairs, ckpt, pp=pp, dp=dp), *LORA]
        args[args.index("dpo")] = "reward"
        del args[args.index("--dpo-beta") : args.index("--dpo-beta") + 2]
        return args

    ckpt = tmp_path / "ckpt"
    assert_all_ok(launch(reward_args(ckpt, pp=2, dp=1), 2, tmp_path))
    assert (ckpt / "checkpoint_10" / "score.safetensors").is_file()
    assert not (ckpt / "checkpoint_10" / "lm_head.safetensors").exists()  # LoRA: adapters and the head only
    rows = [r for r in read_metrics(ckpt) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    (valid,) = [r for r in read_metrics(ckpt) if "valid.loss" in r]

    merged = AutoModelForSequenceClassification.from_pretrained(convert_to_hf(ckpt, tmp_path / "hf")).eval()
    assert_rows_match([reward_evaluation(merged, tiny_hf, pairs[1])], [valid], keys=tuple(valid)[1:])
    with pytest.raises(ValueError, match="is a reward model: export it merged"):
        convert_to_hf(ckpt, tmp_path / "adapter", lora_export="adapter")

    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt / "checkpoint_5", resumed / "checkpoint_5")
    (resumed / "latest").write_text("5\n")
    assert_all_ok(launch(reward_args(resumed, pp=1, dp=1), 1, tmp_path))
    assert_rows_match([r for r in read_metrics(resumed) if "loss" in r], rows[5:], REWARD_KEYS)
