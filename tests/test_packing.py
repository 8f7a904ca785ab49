"""--packing: examples packed apart train as if each ran alone; concat is the stream of before.

The in-process checks compare our stages (chained, pp=1 and pp=2) on a packed batch with HF's
model run on every example by itself; the ranks' check compares a real pp=2 x dp=2 run with
HF's model given the packed batch and its restarting position ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from data.stream import IGNORE_INDEX, TokenStream, parse_task_names
from modules import family_for, load_config
from objectives.loss import token_loss
from pipeline.chain import StageChain
from tests.helpers import assert_all_ok, compare_to_reference, launch, train_args, write_jsonl
from tests.test_families import tiny_converted

SEQ = 32


def stream(tasks: str, tokenizer: object, packing: str | None, seq: int = SEQ, seed: int = 3) -> TokenStream:
    return TokenStream(parse_task_names(tasks), tokenizer, seq, seed, packing=packing)


@pytest.mark.parametrize("family", ["gptneox", "gpt2", "llama", "gemma2"])
def test_documents_train_each_example_as_if_alone(family: str, short_tasks: str, tmp_path: Path) -> None:
    """A packed batch through our stages gives the loss and every gradient that HF's model gives
    running each example of it alone, summed by token count (fp32, 1e-6): rotary and learned
    positions, eager attention with sliding windows and soft-capping (Gemma 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, shards = tiny_converted(tmp_path, family, num_layers=3)
    config = load_config(shards)
    batch = stream(short_tasks, AutoTokenizer.from_pretrained(hf_dir), "documents").next_batch(4)
    blocks = [batch.lengths(row) for row in range(4)]
    assert all(len(b) >= 3 for b in blocks)  # several examples a sequence (and padding)
    tokens = batch.loss_tokens()

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation=config._attn_implementation)
    hf_loss = 0.0
    for row, lengths in enumerate(blocks):
        start = 0
        for n in lengths:
            ids, labels = batch.input_ids[row, start : start + n], batch.labels[row, start : start + n]
            start += n
            count = int((labels[1:] != IGNORE_INDEX).sum())
            if count:  # padding and one-token examples train nothing
                loss = hf(input_ids=ids[None], labels=labels[None]).loss * count / tokens
                loss.backward()
                hf_loss += loss.item()
    hf_grads = {k: p.grad for k, p in hf.named_parameters(remove_duplicate=False)}

    for splits in ([range(0, 3)], [range(0, 1), range(1, 3)]):
        chain = StageChain(family_for(config.model_type), config, splits)
        chain.load(str(shards))
        loss = token_loss(chain(batch.input_ids, batch.positions()), batch.labels, tokens)
        loss.backward()
        chain.sum_tied_grads()
        assert loss.item() == pytest.approx(hf_loss, abs=1e-6), splits
        for part, module in chain.parts():
            for local, param in module.named_parameters():
                reference = hf_grads[chain.family.shard_to_hf(part, local)]
                torch.testing.assert_close(param.grad, reference, atol=1e-6, rtol=1e-5, msg=f"{splits} {part}.{local}")
        # and they differ from attending across the examples (what concat packing computes)
        across = token_loss(chain(batch.input_ids), batch.labels, tokens)
        assert abs(across.item() - hf_loss) > 1e-4  # a hundred times the tolerance above


@pytest.mark.ranks
def test_documents_through_ranks_pp2_dp2_match_hf(
    tiny_hf: Path, tiny_shards: Path, short_tasks: str, tmp_path: Path
) -> None:
    """Positions travel with the activations to the second stage; every replica packs its
    slots apart; losses, gradient norms and final weights equal HF's on the packed batches."""
    ckpt = tmp_path / "ckpt"
    args = train_args(tiny_shards, short_tasks, ckpt, pp=2, dp=2, batch=2, micro=1, accum=2)
    assert_all_ok(launch([*args, "--packing", "documents"], 4, tmp_path))
    compare_to_reference(tiny_hf, short_tasks, ckpt, per_step=8, tmp_path=tmp_path)


def test_concat_is_the_stream_of_before(tmp_path: Path, tiny_hf: Path) -> None:
    """concat: every text and its EOS back to back, cut every SEQ tokens, all trained, positions
    0..SEQ-1; written out here from the tokenizer alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    texts = [f"Sentence number {n} is {'short' if n % 2 else 'a little longer than that'}." for n in range(30)]
    path = write_jsonl(tmp_path / "s.jsonl", texts)
    flat = [
        t for text in texts for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ]
    rows = len(flat) // SEQ
    batch = stream(str(path), tokenizer, "concat").next_batch(rows)
    assert batch.input_ids.tolist() == [flat[r * SEQ : (r + 1) * SEQ] for r in range(rows)]
    assert torch.equal(batch.labels, batch.input_ids)
    assert batch.positions().tolist() == [list(range(SEQ))] * rows and batch.lengths(0) == [SEQ]


def test_none_pads_one_example_a_sequence(tmp_path: Path, tiny_hf: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    texts = ["One.", "Two words.", "Three words here."]
    path = write_jsonl(tmp_path / "s.jsonl", texts)
    batch = stream(str(path), tokenizer, "none").next_batch(3)
    for row, text in enumerate(texts):
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        n = len(ids)
        assert batch.input_ids[row, :n].tolist() == ids and batch.lengths(row) == [n, SEQ - n]
        assert (batch.input_ids[row, n:] == tokenizer.eos_token_id).all()  # no pad token: EOS pads
        assert (batch.labels[row, n:] == IGNORE_INDEX).all() and batch.labels[row, 0] == IGNORE_INDEX
        assert torch.equal(batch.labels[row, 1:n], batch.input_ids[row, 1:n])


def test_a_long_example_is_cut_and_counted_logged_once(
    tmp_path: Path, tiny_hf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    long = " ".join(f"word{n}" for n in range(80))
    path = write_jsonl(tmp_path / "long.jsonl", [long, "Short one.", long])
    packed = stream(str(path), tokenizer, "documents")
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        batch = packed.next_batch(6)
    first = tokenizer(long, add_special_tokens=False)["input_ids"][:SEQ]
    assert batch.input_ids[0].tolist() == first and batch.lengths(0) == [SEQ]
    warnings = [r.getMessage() for r in caplog.records if "longer than --seq-length" in r.getMessage()]
    assert len(warnings) == 1 and f"{path}" in warnings[0] and "--packing concat" in warnings[0]
    (task,) = packed.state_dict()["tasks"].values()
    assert task["truncated"] == 4  # two long examples a pass, two passes


def test_resume_keeps_the_recorded_packing(tmp_path: Path, tiny_hf: Path, short_tasks: str) -> None:
    """A checkpoint's stream from before --packing resumes as concat (saying so); a stream
    resumes bit-exactly with its own packing; naming another packing is refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    for packing in ("documents", "concat", "none"):
        whole = stream(short_tasks, tokenizer, packing).next_batch(20)
        head = stream(short_tasks, tokenizer, packing)
        head.next_batch(7)
        state = json.loads(json.dumps(head.state_dict()))
        tail = stream(short_tasks, tokenizer, None)  # the flag left out: the checkpoint's packing
        tail.load_state_dict(state)
        rest = tail.next_batch(13)
        assert torch.equal(rest.input_ids, whole.input_ids[7:]) and torch.equal(rest.positions(), whole.positions()[7:])
    old = stream(short_tasks, tokenizer, "concat")
    old.next_batch(7)
    state = old.state_dict()
    del state["packing"]  # as written before the flag existed
    resumed = stream(short_tasks, tokenizer, None)
    resumed.load_state_dict(state)
    assert resumed.packing == "concat"
    assert torch.equal(
        resumed.next_batch(13).input_ids, stream(short_tasks, tokenizer, "concat").next_batch(20).input_ids[7:]
    )
    with pytest.raises(ValueError, match="--packing documents, but the checkpoint's data stream was packed concat"):
        stream(short_tasks, tokenizer, "documents").load_state_dict(state)
