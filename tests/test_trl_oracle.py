"""Equal to TRL, checked by TRL: the same records through TRL's own trainers and through the pipeline.

Each test trains HF's model in this process with one of TRL's trainers (tests/trl_oracle.py:
DPOTrainer with each reference, CPOTrainer's SimPO loss, RewardTrainer, SFTTrainer with the loss
on the assistant's tokens) and compares, step by step, every metric TRL logs that the pipeline
also logs (loss, grad_norm, rewards/*, logps/*, accuracy, margin, mean_reward), the evaluation
row, and the final weights, with a pipeline run of the same records at pp=2.

Tolerances. Step 1 agrees to 1e-5 relative: one forward of the same weights on the same tokens,
in fp32. Later steps also allow LOSS_ATOL (1e-5) absolute: TRL pads each batch to its longest
sequence and sums log-probs through HF's fused head, the pipeline pads to --seq-length and sums
per stage; measured over these 10 steps (lr 2e-3, clipping acting) the rows differ by at most
~2e-6 (TRL against the formula of tests/test_preference.py ~2e-6, the pipeline against it ~1e-6),
so the bound has room for the noise and none for a wrong reference, beta or token (a reference
that drifts by 2.8e-3 nats by step 3, as the chunked frozen reference did, fails at step 3).
The gradient norm: TRL logs torch's fp32 norm, the pipeline the exact one, 1e-5 relative.
The final weights agree to WEIGHT_ATOL_TRL: most to ~1e-7, but an embedding row of a token seen
once or twice has a tiny gradient that AdamW divides by its tiny second moment, so the fp32
noise above moves it by up to ~1e-5 (measured 1.1e-5 against TRL, 9.6e-6 TRL against the
formula); 3e-5 is still ~70 times smaller than one step's move at lr 2e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convert.to_hf import convert_to_hf
from modules.lora import LoraSpec
from tests import trl_oracle
from tests.helpers import (
    LOSS_ATOL,
    SEED,
    SEQ,
    STEPS,
    assert_same_state,
    bundled_texts,
    load_hf_state,
    peft_reference_model,
    read_metrics,
    saved_adapters,
    train_args,
)
from tests.preference_runs import (
    BETA,
    CHUNKED,
    LORA,
    PAIRS_PER_STEP,
    SIMPO_GAMMA,
    Run,
    dpo_args,
    run,
)

pytestmark = pytest.mark.ranks  # every test here starts rank processes


DPO_KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")  # fmt: skip
REWARD_KEYS = ("loss", "grad_norm", "accuracy", "margin", "mean_reward")
WEIGHT_ATOL_TRL = 3e-5
SFT_SEQ = 96  # a conversation in ChatML spelled out by the tiny tokenizer's bytes
CHATML_TRAINED_CLOSE = (  # the assistant's <|im_end|> inside its generation block: both trainers train it
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def assert_rows_equal_trl(ours: list[dict], theirs: list[dict], keys: tuple[str, ...]) -> None:
    assert len(ours) == len(theirs) == STEPS
    for step, (mine, trl) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key in keys:
            if key == "grad_norm":
                tolerance = {"rel": 1e-5}
            else:
                tolerance = {"rel": 1e-5} if step == 1 else {"rel": 1e-5, "abs": LOSS_ATOL}
            assert mine[key] == pytest.approx(trl[key], **tolerance), (step, key, mine[key], trl[key])


def assert_evaluation_equal_trl(ours: dict, theirs: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key != "grad_norm":
            assert ours[f"valid.{key}"] == pytest.approx(theirs[f"eval_{key}"], rel=1e-5, abs=LOSS_ATOL), key


def training_rows(ckpt: Path) -> list[dict]:
    return [r for r in read_metrics(ckpt) if "loss" in r]


def evaluation_row(ckpt: Path) -> dict:
    (valid,) = [r for r in read_metrics(ckpt) if "valid.loss" in r]
    return valid


# -- DPO: each reference, whole logits and chunked --------------------------------------------------


@pytest.fixture(scope="module")
def trl_dpo(tiny_hf: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """TRL's DPOTrainer on full fine-tuning: its reference precomputed, or each step's frozen copy."""
    from transformers import AutoModelForCausalLM

    runs = {}
    for reference in ("precomputed", "live"):
        model = AutoModelForCausalLM.from_pretrained(tiny_hf, attn_implementation="sdpa")
        out = tmp_path_factory.mktemp(f"trl_dpo_{reference}")
        runs[reference] = trl_oracle.dpo(model, tiny_hf, *pairs, out, PAIRS_PER_STEP, BETA, reference, SEQ)
    return runs


@pytest.fixture(scope="module")
def trl_dpo_lora(
    tiny_hf: Path, pairs: tuple[str, str], dpo_lora_run: Run, tmp_path_factory: pytest.TempPathFactory
) -> trl_oracle.TrlRun:
    """TRL's DPOTrainer on PEFT's LoRA model (adapters started as ours): the reference is the model
    with its adapters off."""
    spec = LoraSpec.read(dpo_lora_run.ckpt / "checkpoint_10")[0]
    model = peft_reference_model(tiny_hf, spec, SEED)
    out = tmp_path_factory.mktemp("trl_lora")
    return trl_oracle.dpo(model, tiny_hf, *pairs, out, PAIRS_PER_STEP, BETA, "live", SEQ)


@pytest.fixture(scope="module")
def dpo_precomputed_chunked_run(tiny_shards: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    return run(tmp_path_factory, "dpo_precomputed_chunked",
               lambda ckpt: [*dpo_args(tiny_shards, pairs, ckpt, pp=2, dp=1), *CHUNKED], world=2)  # fmt: skip


@pytest.fixture(scope="module")
def dpo_frozen_whole_run(tiny_shards: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    return run(tmp_path_factory, "dpo_frozen_whole",
               lambda ckpt: [*dpo_args(tiny_shards, pairs, ckpt, pp=2, dp=1), "--dpo-reference", "frozen"],
               world=2)  # fmt: skip


@pytest.fixture(scope="module")
def dpo_lora_chunked_run(tiny_shards: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    extra = (*LORA, "--dpo-reference", "frozen", *CHUNKED)
    return run(tmp_path_factory, "dpo_lora_chunked",
               lambda ckpt: [*dpo_args(tiny_shards, pairs, ckpt, pp=2, dp=1), *extra], world=2)  # fmt: skip


@pytest.mark.parametrize(
    ("ours", "reference"),
    [
        ("dpo_run", "precomputed"),  # pp=2 x dp=2, whole logits
        ("dpo_precomputed_chunked_run", "precomputed"),  # pp=2, chunked
        ("dpo_frozen_chunked_run", "live"),  # pp=2 x dp=2, chunked: the copy's own output layer
        ("dpo_frozen_whole_run", "live"),  # pp=2, whole logits
    ],
)
def test_dpo_equals_trl_with_each_reference(
    request: pytest.FixtureRequest, trl_dpo: dict, ours: str, reference: str, tmp_path: Path
) -> None:
    ckpt, trl = request.getfixturevalue(ours).ckpt, trl_dpo[reference]
    rows = training_rows(ckpt)
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # the policy is the reference
    assert_rows_equal_trl(rows, trl.steps, DPO_KEYS)
    assert_evaluation_equal_trl(evaluation_row(ckpt), trl.evaluation, DPO_KEYS)
    assert_same_state(load_hf_state(convert_to_hf(ckpt, tmp_path / "hf")), trl.weights, WEIGHT_ATOL_TRL)


@pytest.mark.parametrize("ours", ["dpo_lora_run", "dpo_lora_chunked_run"])  # whole logits (1F1B), chunked
def test_dpo_with_lora_equals_trl_whose_reference_is_the_adapters_off(
    request: pytest.FixtureRequest, trl_dpo_lora: trl_oracle.TrlRun, ours: str
) -> None:
    ckpt = request.getfixturevalue(ours).ckpt
    assert_rows_equal_trl(training_rows(ckpt), trl_dpo_lora.steps, DPO_KEYS)
    assert_evaluation_equal_trl(evaluation_row(ckpt), trl_dpo_lora.evaluation, DPO_KEYS)
    assert_same_state(saved_adapters(ckpt / "checkpoint_10"), trl_dpo_lora.weights, WEIGHT_ATOL_TRL)


# -- SimPO: TRL's CPO trainer with the SimPO loss ---------------------------------------------------


def test_simpo_equals_trls_cpo_trainer_with_the_simpo_loss(
    tiny_hf: Path, pairs: tuple[str, str], simpo_run: Run, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf, attn_implementation="sdpa")
    trl = trl_oracle.simpo(model, tiny_hf, pairs[0], tmp_path / "trl", PAIRS_PER_STEP, BETA, SIMPO_GAMMA, SEQ)
    assert_rows_equal_trl(training_rows(simpo_run.ckpt), trl.steps, DPO_KEYS)
    assert_same_state(load_hf_state(convert_to_hf(simpo_run.ckpt, tmp_path / "hf")), trl.weights, WEIGHT_ATOL_TRL)


# -- a reward model, started from an HF reward model --------------------------------------------------


def test_a_reward_model_converted_from_hf_trains_as_trls_reward_trainer_and_exports_back(
    tiny_hf: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An HF sequence classifier converted by convert/from_hf.py trains at pp=2 as TRL's
    RewardTrainer trains the classifier itself, and its export is TRL's final model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from convert.from_hf import convert_from_hf

    root = tmp_path_factory.mktemp("reward_from_hf")
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    torch.manual_seed(11)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_hf, num_labels=1,
                                                                    pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    classifier.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    shards = convert_from_hf(root / "rm", root / "shards")

    def args(ckpt: Path) -> list[str]:
        return [*train_args(shards, pairs[0], ckpt, pp=2, dp=1, batch=PAIRS_PER_STEP, micro=1, accum=1),
                "--objective", "reward", "--evaluation-data", pairs[1], "--evaluation-num-batch", "5"]  # fmt: skip

    ours = run(tmp_path_factory, "reward_run", args, world=2)
    model = AutoModelForSequenceClassification.from_pretrained(root / "rm", attn_implementation="sdpa")
    trl = trl_oracle.reward(model, root / "rm", *pairs, root / "trl", PAIRS_PER_STEP, SEQ)
    assert_rows_equal_trl(training_rows(ours.ckpt), trl.steps, REWARD_KEYS)
    assert_evaluation_equal_trl(evaluation_row(ours.ckpt), trl.evaluation, REWARD_KEYS)
    exported = AutoModelForSequenceClassification.from_pretrained(convert_to_hf(ours.ckpt, root / "hf"))
    assert_same_state(exported.state_dict(), trl.weights, WEIGHT_ATOL_TRL)


# -- SFT on conversations, the assistant's tokens trained, with weight decay ---------------------------


def write_conversations(path: Path, texts: list[str]) -> Path:
    """Chat records: a question and the assistant's answer, every third with a system turn and a
    second exchange (two assistant turns to train, the turns between them context)."""
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            words = text.split()
            messages = [{"role": "user", "content": " ".join(words[:4]) + "?"},
                        {"role": "assistant", "content": " ".join(words[4:10])}]  # fmt: skip
            if i % 3 == 0:
                second = [{"role": "user", "content": "And?"}, {"role": "assistant", "content": words[-1]}]
                messages = [{"role": "system", "content": "Be brief."}, *messages, *second]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_assistant_only_sft_with_weight_decay_equals_trls_sft_trainer(
    tiny_hf: Path, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Conversations through the chat template, the loss on the assistant's tokens only, and
    weight decay 0.1 (which HF's Trainer keeps off biases and norm weights: with decay on them,
    the final weights part by far more than the tolerance)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sft")
    data = write_conversations(root / "chat.jsonl", bundled_texts()[:120])
    template = root / "chatml.jinja"
    template.write_text(CHATML_TRAINED_CLOSE)

    def args(ckpt: Path) -> list[str]:
        base = train_args(tiny_shards, str(data), ckpt, pp=2, dp=1, batch=PAIRS_PER_STEP, micro=2, accum=1)
        base[base.index("--seq-length") + 1] = str(SFT_SEQ)
        return [*base, "--packing", "none", "--chat-template", str(template), "--weight-decay", "0.1"]

    ours = run(tmp_path_factory, "sft_run", args, world=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, attn_implementation="sdpa")
    trl = trl_oracle.sft(model, tiny_hf, str(data), root / "trl", PAIRS_PER_STEP, SFT_SEQ, 0.1, CHATML_TRAINED_CLOSE)
    assert_rows_equal_trl(training_rows(ours.ckpt), trl.steps, ("loss", "grad_norm"))
    assert_same_state(load_hf_state(convert_to_hf(ours.ckpt, root / "hf")), trl.weights, WEIGHT_ATOL_TRL)
