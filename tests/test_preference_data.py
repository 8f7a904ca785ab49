"""Preference pairs as users bring them, the sequences they become, and DPO's pieces on their
own: each sequence's log-probability with and without the chunked head, the loss with label
smoothing, the reference table, and the flags' refusals. No process group."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from data.chat import ChatTemplate
from data.pairs import READ_CHUNK, PairPacker, all_pairs
from data.sources import Pair, Source, pair_from_record
from data.stream import IGNORE_INDEX, TokenStream, parse_task_names
from objectives.loss import chunked_token_loss, sequence_logps
from objectives.reference import ReferenceLogps
from tests.preference_runs import write_pairs
from tests.test_chat_data import CHATML
from trainer.cli import config_from_args, parse_args


@pytest.fixture(scope="module")
def tokenizer(tiny_hf: Path) -> object:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def test_the_preference_formats_users_bring() -> None:
    # TRL's explicit prompt, as text
    pair = pair_from_record({"prompt": "Q?", "chosen": " yes", "rejected": " no"}, "f:1", 1)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.line) == ("Q?", " yes", " no", 1)
    # Anthropic HH: two whole texts; the prompt is what they share, the space before the split goes with the responses
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    pair = pair_from_record(hh, "f:2", 2)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("\n\nHuman: hi\n\nAssistant:", " hello there", " go away")
    # conversational, with and without an explicit prompt
    user = {"role": "user", "content": "hi"}
    good, bad = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "go away"}
    explicit = pair_from_record({"prompt": [user], "chosen": [good], "rejected": [bad]}, "f:3", 3)
    implicit = pair_from_record({"chosen": [user, good], "rejected": [user, bad]}, "f:3", 3)
    assert explicit == implicit and explicit.conversational
    assert explicit.prompt == (("user", "hi"),) and explicit.chosen == (("assistant", "hello"),)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"prompt": "Q", "chosen": " a"}, "expected a preference pair"),
        ({"prompt": "Q", "chosen": " a", "rejected": " a"}, "are the same response"),
        ({"prompt": "Q", "chosen": "", "rejected": " a"}, "the chosen response is empty"),
        ({"chosen": "same text", "rejected": "same text plus"}, "the chosen response is empty"),
        ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"}, "all be strings or all"),
        ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "user", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "the chosen response has no assistant turn"),
        (["Q", " a", " b"], "expected a preference pair"),
        ({"prompt": [], "chosen": [{"role": "bot", "content": "a"}], "rejected": []},
         "'chosen' turn 1 has unknown role 'bot'"),
    ],
)  # fmt: skip
def test_a_bad_pair_names_its_line_and_problem(tmp_path: Path, record: object, problem: str) -> None:
    with pytest.raises(ValueError, match="f:9: ") as err:
        pair_from_record(record, "f:9", 9)
    assert problem in str(err.value)
    # under --skip-bad-lines it is skipped and counted; the good pair after it is read
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\n")
    source = Source(path, skip_bad_lines=True, pairs=True)
    assert source.read(1) == [Pair("Q", " a", " b", 2)] and source.bad_lines == 1


def decoded(tokenizer: object, tokens: list[int], targets: list[int]) -> str:
    return tokenizer.decode([t for t, scored in zip(tokens, targets, strict=True) if scored])


def test_pairs_become_two_sequences_scoring_their_responses_only(tmp_path: Path, tokenizer: object) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Bo saw a", "chosen": " red fox", "rejected": " tall tree by the lake"}))
    packer = PairPacker(Source(path, pairs=True), tokenizer, tokenizer.eos_token_id, 0, ChatTemplate(tokenizer))
    pair = packer.next_pair(24)
    prompt = tokenizer("Bo saw a", add_special_tokens=False)["input_ids"]
    responses = ((pair.chosen, " red fox"), (pair.rejected, " tall tree by the lake"))
    for (tokens, targets, positions), response in responses:
        body = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokens[: len(prompt) + len(body)] == prompt + body
        assert targets == [0] * len(prompt) + [1] * len(body) + [0] * (24 - len(prompt) - len(body))
        assert positions == [*range(len(prompt) + len(body)), *range(24 - len(prompt) - len(body))]
        assert decoded(tokenizer, tokens, targets) == response + tokenizer.eos_token


def test_a_conversational_pair_scores_the_response_turns_not_the_prompts(tmp_path: Path, tokenizer: object) -> None:
    record = {
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Colour of the sky?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Loud."}],
    }  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    chat = ChatTemplate(tokenizer, CHATML)
    pair = PairPacker(Source(path, pairs=True), tokenizer, tokenizer.eos_token_id, 0, chat).next_pair(64)
    assert decoded(tokenizer, *pair.chosen[:2]) == "Blue.<|im_end|>"
    assert decoded(tokenizer, *pair.rejected[:2]) == "Loud.<|im_end|>"
    # the prompt (its assistant turn included) is the same context in both
    start = pair.chosen[1].index(1)
    assert pair.chosen[0][:start] == pair.rejected[0][:start]
    assert "Hello!" in tokenizer.decode(pair.chosen[0][:start])


def test_a_pair_too_long_loses_its_prompts_start_then_its_responses_end(
    tmp_path: Path, tokenizer: object, caplog: pytest.LogCaptureFixture
) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": words, "chosen": " yes", "rejected": " " + words}) + "\n")
    packer = PairPacker(Source(path, pairs=True), tokenizer, tokenizer.eos_token_id, 0, ChatTemplate(tokenizer))
    with caplog.at_level(logging.WARNING):
        pair = packer.next_pair(16)
    # logged once; counted for each pair read (a chunk of READ_CHUNK, cycling the one-pair file)
    assert caplog.text.count("longer than --seq-length 16") == 1 and packer.truncated == READ_CHUNK
    prompt = tokenizer(words, add_special_tokens=False)["input_ids"]
    for tokens, targets, _ in (pair.chosen, pair.rejected):
        assert tokens[:8] == prompt[-8:]  # both keep the prompt's last half of the sequence length
        assert len(tokens) == 16 and targets[:8] == [0] * 8 and targets[8] == 1
    assert pair.rejected[1][8:] == [1] * 8  # the long response is cut at its end
    assert packer.state_dict()["truncated"] == READ_CHUNK


def trl_rows(tokenizer: object, record: dict, max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
    """TRL's own tokens and completion mask of a text pair's two sequences (DPOTrainer's
    tokenisation: the prompt, and prompt + response + EOS, through ``tokenizer``'s call, the
    completion from where they part; then its collator's ``keep_start`` truncation)."""
    from trl.data_utils import common_prefix_length
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    prompt = tokenizer(record["prompt"])["input_ids"]
    whole = {
        k: tokenizer(record["prompt"] + record[k] + tokenizer.eos_token)["input_ids"] for k in ("chosen", "rejected")
    }
    start = min(common_prefix_length(prompt, ids) for ids in whole.values())
    example = {"prompt_ids": prompt[:start], **{f"{k}_ids": ids[start:] for k, ids in whole.items()}}
    out = DataCollatorForPreference(pad_token_id=-1, max_length=max_length)([example])
    return [
        ([t for t in ids if t != -1], mask[: int((ids != -1).sum())].tolist())
        for ids, mask in zip(out["input_ids"], out["completion_mask"], strict=True)
    ]


@pytest.mark.parametrize("bos", [False, True])
def test_a_text_pair_is_tokenised_as_trl_tokenises_it(tmp_path: Path, bos: bool) -> None:
    """With a tokenizer that puts BOS before a text (Llama 3's) both sequences start with it, as in
    TRL; without, nothing is added. Tokens and scored positions equal TRL's."""
    from tests.helpers import bos_tokenizer, bundled_texts

    tokenizer = bos_tokenizer(bundled_texts()[:200])
    if not bos:
        tokenizer.backend_tokenizer.post_processor = None
    record = {"prompt": "Bo saw a", "chosen": " red fox", "rejected": " tall tree by the lake"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    batch = TokenStream(parse_task_names(str(path)), tokenizer, 24, 0, packing="none", pairs=True).next_batch(2)
    for row, (theirs, mask) in enumerate(trl_rows(tokenizer, record)):  # chosen, then rejected
        tokens, targets = batch.input_ids[row].tolist(), (batch.labels[row] != IGNORE_INDEX).long().tolist()
        assert tokens[: len(theirs)] == theirs and targets[: len(mask)] == mask
        assert (tokens[0] == tokenizer.bos_token_id) == bos


def test_keep_start_cuts_as_trl_and_drops_a_pair_whose_prompt_fills_the_length(
    tmp_path: Path, tokenizer: object, caplog: pytest.LogCaptureFixture
) -> None:
    """--truncation-mode keep_start: each sequence keeps its first --seq-length tokens, as TRL's
    collator keeps them; a pair whose prompt alone fills the length is dropped (TRL filters it
    out), logged once and counted; the next pair is drawn in its place."""
    words = " ".join(f"w{i}" for i in range(40))
    long_prompt = {"prompt": words, "chosen": " yes", "rejected": " no"}
    record = {"prompt": "w1 w2 w3", "chosen": " yes", "rejected": " " + words}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(long_prompt) + "\n" + json.dumps(record) + "\n")
    packer = PairPacker(Source(path, pairs=True), tokenizer, tokenizer.eos_token_id, 0, ChatTemplate(tokenizer),
                        truncation="keep_start")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        pair = packer.next_pair(16)
    assert pair.line == 2 and packer.dropped >= 1 and caplog.text.count("is dropped under --truncation-mode") == 1
    for (tokens, targets, _), (theirs, mask) in zip((pair.chosen, pair.rejected), trl_rows(tokenizer, record, 16),
                                                     strict=True):  # fmt: skip
        assert tokens[: len(theirs)] == theirs and targets[: len(mask)] == mask
    assert len(trl_rows(tokenizer, record, 16)[1][0]) == 16  # the rejected sequence was cut, at its end
    assert packer.state_dict()["dropped"] == packer.dropped
    # a file of nothing but such pairs is an error, not a wait forever
    path.write_text(json.dumps(long_prompt) + "\n")
    packer = PairPacker(Source(path, pairs=True), tokenizer, tokenizer.eos_token_id, 0, ChatTemplate(tokenizer),
                        truncation="keep_start")  # fmt: skip
    with pytest.raises(ValueError, match="no pair of a whole pass over the file could be used"):
        packer.next_pair(16)


def test_the_pair_stream_alternates_chosen_and_rejected_and_resumes_exactly(tmp_path: Path, tokenizer: object) -> None:
    from tests.helpers import bundled_texts

    a = write_pairs(tmp_path / "a.jsonl", bundled_texts()[:30], 7)
    b = write_pairs(tmp_path / "b.jsonl", bundled_texts()[30:50], 3)
    tasks = parse_task_names(f"{a}:0.6,{b}:0.4")

    def stream() -> TokenStream:
        return TokenStream(tasks, tokenizer, 32, 5, packing="none", pairs=True)

    first = stream()
    batch = first.next_batch(6)
    assert batch.input_ids.shape == (6, 32)
    assert batch.tasks[0::2] == batch.tasks[1::2] and batch.records[0::2] == batch.records[1::2]
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_batch(6) for _ in range(12)]  # past the end of b.jsonl: a second pass
    resumed = stream()
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch(6)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
        assert got.records == want.records
    # a resume that would cut the pairs another way is refused, naming both ways
    other = TokenStream(tasks, tokenizer, 32, 5, packing="none", pairs=True, truncation="keep_start")
    with pytest.raises(ValueError, match="--truncation-mode keep_start, but the checkpoint's pairs were cut keep_end"):
        other.load_state_dict(state)
    # every pair of a file once, in order
    source = Source(b, pairs=True)
    lines = [p.line for p in all_pairs(PairPacker(source, tokenizer, 0, 0, ChatTemplate(tokenizer)), 32)]
    assert lines == list(range(1, 21))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_sequence_logps_chunked_equal_the_logits_way(softcap: float | None) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(4, 9, 16, requires_grad=True)
    output = nn.Linear(16, 50)
    labels = torch.randint(0, 50, (4, 9))
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[1, 7:] = IGNORE_INDEX  # padding

    def capped(x: torch.Tensor) -> torch.Tensor:
        return x if softcap is None else softcap * torch.tanh(x / softcap)

    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # each sequence's own gradient, as DPO gives them
    full = sequence_logps(capped(output(hidden)), labels)
    (full * weights).sum().backward()
    grads = [hidden.grad.clone(), output.weight.grad.clone(), output.bias.grad.clone()]
    for t in (hidden, output.weight, output.bias):
        t.grad = None
    chunked = sequence_logps(hidden, labels, output, chunk=5, softcap=softcap)
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    for mine, theirs in zip((hidden.grad, output.weight.grad, output.bias.grad), grads, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # and the token loss is their negated sum over the trained tokens
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    loss = chunked_token_loss(hidden, output, labels, tokens, chunk=5, softcap=softcap)
    torch.testing.assert_close(loss, -chunked.sum() / tokens, atol=1e-6, rtol=0)


def test_the_reference_table_is_used_only_for_its_run_and_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = ReferenceLogps([{"name": "a.jsonl", "hash": "h1", "lines": [1, 3], "logps": [[-1.5, -2.0], [-3.0, -4.25]]}])
    path = tmp_path / "ref.json"
    table.save(path, {"model": "m"}, 32, "keep_end")
    loaded = ReferenceLogps.load(path, {"model": "m"}, 32, "keep_end", [("a.jsonl", "h1")])
    assert loaded.rows([(0, 3), (0, 1)]).tolist() == [-3.0, -4.25, -1.5, -2.0]
    with caplog.at_level(logging.WARNING):
        assert ReferenceLogps.load(path, {"model": "m"}, 32, "keep_end", [("a.jsonl", "h2")]) is None  # data changed
        assert ReferenceLogps.load(path, {"model": "other"}, 32, "keep_end", [("a.jsonl", "h1")]) is None
        assert ReferenceLogps.load(path, {"model": "m"}, 64, "keep_end", [("a.jsonl", "h1")]) is None
        assert ReferenceLogps.load(path, {"model": "m"}, 32, "keep_start", [("a.jsonl", "h1")]) is None
    assert "computed for another model, sequence length, truncation or data" in caplog.text
    assert ReferenceLogps.load(tmp_path / "none.json", {}, 32, "keep_end", []) is None
    # a table written before --truncation-mode existed was cut keep_end
    saved = json.loads(path.read_text())
    del saved["truncation"]
    path.write_text(json.dumps(saved))
    assert ReferenceLogps.load(path, {"model": "m"}, 32, "keep_end", [("a.jsonl", "h1")]) is not None


def test_dpo_flags_count_pairs_and_refuse_what_cannot_work(tiny_shards: Path, tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "p.jsonl", ["a b c d e f g h i j k l"] * 3, 1)
    base = ["--rank", "0", "--model-name", str(tiny_shards), "--task-name", str(path), "--objective", "dpo"]
    cfg = config_from_args(parse_args([*base, "--batch-size", "3", "--micro-batch-size", "1"]))
    assert (cfg.batch.batch_size, cfg.batch.micro_batch_size) == (6, 2)  # sequences: two a pair
    assert cfg.objective.beta == 0.1 and cfg.fingerprint() != config_from_args(parse_args(base[:-2])).fingerprint()
    for extra, message in (
        (["--packing", "documents"], "each sequence is one response to its prompt (packing none); drop --packing"),
        (["--dpo-beta", "0"], "--dpo-beta must be positive"),
        (["--dpo-label-smoothing", "0.5"], "--dpo-label-smoothing must lie in [0, 0.5)"),
        (["--elastic", "--data-group-size", "2"], "does not run with --elastic or --spares yet"),
    ):
        with pytest.raises(ValueError) as err:
            config_from_args(parse_args([*base, *extra]))
        assert message in str(err.value)
    assert config_from_args(parse_args([*base, "--truncation-mode", "keep_start"])).data.pair_truncation == "keep_start"
    assert config_from_args(parse_args(base)).data.pair_truncation == "keep_end"
    with pytest.raises(ValueError, match="--truncation-mode applies to preference pairs"):
        config_from_args(parse_args([*base[:-2], "--truncation-mode", "keep_start"]))
    with pytest.raises(ValueError, match="--dpo-beta applies to --objective dpo; add that or drop it"):
        config_from_args(parse_args([*base[:-2], "--dpo-beta", "0.3"]))
    simpo = config_from_args(parse_args([*base, "--dpo-loss", "simpo", "--simpo-gamma", "1.0"]))
    assert not simpo.objective.needs_reference and simpo.objective.describe() == "dpo:simpo"
    with pytest.raises(ValueError, match="--simpo-gamma applies to --dpo-loss simpo"):
        config_from_args(parse_args([*base, "--simpo-gamma", "1.0"]))
    with pytest.raises(ValueError, match="--dpo-loss simpo uses no reference model: drop --dpo-reference"):
        config_from_args(parse_args([*base, "--dpo-loss", "simpo", "--dpo-reference", "frozen"]))
    with pytest.raises(ValueError, match="--dpo-reference applies to --objective dpo; add that or drop it"):
        config_from_args(parse_args([*base[:-2], "--dpo-reference", "frozen"]))
    # a reward model counts pairs too; it needs no reference, so an elastic run may lose replicas
    reward = [*base[:-1], "reward", "--batch-size", "2", "--micro-batch-size", "2"]
    cfg = config_from_args(parse_args([*reward, "--elastic", "--data-group-size", "2"]))
    assert cfg.objective.reward_model and cfg.objective.pairs and cfg.batch.micro_batch_size == 4
    with pytest.raises(ValueError, match="--dpo-label-smoothing applies to --objective dpo"):
        config_from_args(parse_args([*reward, "--dpo-label-smoothing", "0.1"]))


def test_preview_shows_each_pair_as_its_two_sequences(tiny_hf: Path, tmp_path: Path) -> None:
    import io

    from data.config import DataConfig
    from data.preview import preview

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Bo saw a", "chosen": " red fox", "rejected": " tall tree"}) + "\n")
    data = DataConfig(parse_task_names(str(path)), 16)
    out = io.StringIO()
    preview(data, str(tiny_hf), 2, out, pairs=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["response"], r["record"]) for r in rows] == [("chosen", 1), ("rejected", 1)] * 2
    assert rows[0]["text"].startswith("Bo saw a red fox") and rows[1]["text"].startswith("Bo saw a tall tree")
    text = io.StringIO()
    preview(data, str(tiny_hf), 1, text, form="text", pairs=True)
    assert "--- pair 1, rejected" in text.getvalue() and "Bo saw a[[ tall tree" in text.getvalue()
