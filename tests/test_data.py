"""The task list and the packed token stream: weights, determinism, EOS packing, resume, errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from data.sources import Source
from data.stream import TokenStream, parse_task_names
from tests.helpers import bundled_texts, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_hf: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf)


@pytest.fixture
def small_task(tmp_path: Path) -> tuple[Path, list[str]]:
    texts = bundled_texts()[:5]
    return write_jsonl(tmp_path / "small.jsonl", texts), texts


# --- parse_task_names -------------------------------------------------------------------------


def test_weights_are_normalised(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    b = write_jsonl(tmp_path / "b.jsonl", ["y"])
    c = write_jsonl(tmp_path / "c.jsonl", ["z"])
    tasks = parse_task_names(f"{a}:2,{b}:6, {c}:0")
    assert [t.path for t in tasks] == [a, b, c]
    assert [t.weight for t in tasks] == pytest.approx([0.25, 0.75, 0.0])


def test_default_weight_is_one(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    b = write_jsonl(tmp_path / "b.jsonl", ["y"])
    assert [t.weight for t in parse_task_names(f"{a},{b}:3")] == pytest.approx([0.25, 0.75])
    assert [t.weight for t in parse_task_names(str(a))] == [1.0]


def test_negative_weight_names_the_file(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ValueError, match="--task-name") as exc:
        parse_task_names(f"{a}:-0.5")
    assert str(a) in str(exc.value) and "-0.5" in str(exc.value)


def test_all_zero_weights_name_the_flag(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    b = write_jsonl(tmp_path / "b.jsonl", ["y"])
    with pytest.raises(ValueError, match="--task-name weights are all zero"):
        parse_task_names(f"{a}:0,{b}:0.0")


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        parse_task_names(str(tmp_path / "nope.jsonl"))


def test_empty_file_names_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty") as exc:
        parse_task_names(str(empty))
    assert str(empty) in str(exc.value)


def test_unknown_extension_names_the_file(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("plain text\n")
    with pytest.raises(ValueError, match="unsupported") as exc:
        parse_task_names(str(txt))
    assert str(txt) in str(exc.value) and ".txt" in str(exc.value)


def test_empty_spec_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--task-name"):
        parse_task_names(" , ")


# --- TokenStream ------------------------------------------------------------------------------


def make_stream(spec: str, tokenizer: object, seq_length: int = 16, seed: int = 3) -> TokenStream:
    """The concat stream (documents packing: tests/test_packing.py)."""
    return TokenStream(parse_task_names(spec), tokenizer, seq_length, seed, packing="concat")


def test_stream_is_deterministic_per_seed(two_tasks: str, tokenizer: object) -> None:
    first = make_stream(two_tasks, tokenizer, seed=5).next_batch(40).input_ids
    second = make_stream(two_tasks, tokenizer, seed=5).next_batch(40).input_ids
    other = make_stream(two_tasks, tokenizer, seed=6).next_batch(40).input_ids
    assert first.shape == (40, 16) and first.dtype == torch.long
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_sequences_have_the_requested_shape(two_tasks: str, tokenizer: object) -> None:
    stream = make_stream(two_tasks, tokenizer, seq_length=33)
    assert stream.next_batch(3).input_ids.shape == (3, 33)
    assert stream.next_batch(1).input_ids.shape == (1, 33)
    ids = stream.next_batch(5).input_ids
    assert int(ids.min()) >= 0 and int(ids.max()) < len(tokenizer)


def test_documents_are_packed_with_eos_between(small_task: tuple[Path, list[str]], tokenizer: object) -> None:
    path, texts = small_task
    stream = make_stream(str(path), tokenizer, seq_length=80)
    ids = stream.next_batch(8).input_ids
    eos = tokenizer.eos_token
    joined = "".join(text + eos for text in texts) * 3  # 640 tokens: the 5 documents come round again
    # the first sequence alone already spans a document boundary
    assert eos in tokenizer.decode(ids[0].tolist())
    # back to back, the sequences are the documents in order, each followed by EOS
    decoded = tokenizer.decode(ids.reshape(-1).tolist())
    assert len(decoded) > len(texts[0]) + len(texts[1])
    assert joined.startswith(decoded), (decoded[:200], joined[:200])
    assert int((ids == tokenizer.eos_token_id).sum()) == decoded.count(eos)


def test_a_task_starts_over_when_it_runs_out(small_task: tuple[Path, list[str]], tokenizer: object) -> None:
    path, texts = small_task
    total_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    count = math.ceil(2.5 * total_tokens / 16)
    decoded = tokenizer.decode(make_stream(str(path), tokenizer, seq_length=16).next_batch(count).input_ids.reshape(-1))
    one_pass = "".join(text + tokenizer.eos_token for text in texts)
    assert decoded.startswith(one_pass + one_pass)


def test_task_shares_follow_the_weights(two_tasks: str, tokenizer: object) -> None:
    # task a is the corpus as is, task b the same texts upper-cased: lower-case letters tell them apart
    n = 2000
    ids = make_stream(two_tasks, tokenizer, seq_length=16, seed=11).next_batch(n).input_ids
    from_a = 0
    for row in ids.tolist():
        text = tokenizer.decode(row).replace(tokenizer.eos_token, "")
        from_a += any(c.islower() for c in text)
    share, p = from_a / n, 0.7
    assert abs(share - p) < 3 * math.sqrt(p * (1 - p) / n), share


@pytest.mark.parametrize("json_round_trip", [False, True])
def test_resume_gives_exactly_the_next_sequences(two_tasks: str, tokenizer: object, json_round_trip: bool) -> None:
    uninterrupted = make_stream(two_tasks, tokenizer, seq_length=40)
    uninterrupted.next_batch(7)
    uninterrupted.next_batch(5)
    expected = uninterrupted.next_batch(30).input_ids

    first = make_stream(two_tasks, tokenizer, seq_length=40)
    first.next_batch(7)
    first.next_batch(5)
    state = first.state_dict()
    if json_round_trip:
        state = json.loads(json.dumps(state))
    # mid-document: a resume that dropped the packer's leftover tokens would be caught
    assert any(task["tokens"] for task in state["tasks"].values())

    resumed = make_stream(two_tasks, tokenizer, seq_length=40, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(30).input_ids, expected)


def test_resume_across_the_end_of_a_file(small_task: tuple[Path, list[str]], tokenizer: object) -> None:
    path, _ = small_task
    whole = make_stream(str(path), tokenizer, seq_length=16).next_batch(90).input_ids
    for cut in (13, 41, 67):  # the 5-document file wraps around several times
        head = make_stream(str(path), tokenizer, seq_length=16)
        assert torch.equal(head.next_batch(cut).input_ids, whole[:cut])
        state = json.loads(json.dumps(head.state_dict()))
        tail = make_stream(str(path), tokenizer, seq_length=16)
        tail.load_state_dict(state)
        assert torch.equal(tail.next_batch(90 - cut).input_ids, whole[cut:]), cut


def test_resume_with_other_tasks_names_the_task(two_tasks: str, small_task: tuple[Path, list[str]], tokenizer: object):
    path, _ = small_task
    state = make_stream(two_tasks, tokenizer).state_dict()
    other = make_stream(str(path), tokenizer)
    with pytest.raises(ValueError, match=r"small\.jsonl"):
        other.load_state_dict(state)


# --- malformed files --------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path: Path, tokenizer: object) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "never read"}\n')
    stream = make_stream(str(path), tokenizer)
    with pytest.raises(ValueError, match="JSON") as exc:
        stream.next_batch(1)
    assert f"{path}:3" in str(exc.value)


def test_line_without_text_names_line_and_field(tmp_path: Path, tokenizer: object) -> None:
    path = tmp_path / "fields.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    stream = make_stream(str(path), tokenizer)
    with pytest.raises(ValueError, match="'text'") as exc:
        stream.next_batch(1)
    assert f"{path}:2" in str(exc.value) and "content" in str(exc.value)


@pytest.mark.parametrize("line", ['{"text": 3}', '["text"]', '"text"'])
def test_text_must_be_a_string_in_an_object(tmp_path: Path, tokenizer: object, line: str) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1")):
        make_stream(str(path), tokenizer).next_batch(1)


def test_a_file_of_blank_lines_is_refused(tmp_path: Path, tokenizer: object) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no usable examples") as exc:
        make_stream(str(path), tokenizer).next_batch(1)
    assert str(path) in str(exc.value)


def test_errors_after_a_resume_still_name_the_right_line(tmp_path: Path) -> None:
    path = tmp_path / "late.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n\n{"text": "c"}\n{"oops": 1}\n')
    first = Source(path)
    assert [e.completion for e in first.read(2)] == ["a", "b"]
    resumed = Source(path)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    with pytest.raises(ValueError, match=re.escape(f"{path}:5")):
        resumed.read(2)


# --- special tokens, as HF's tokenizer puts them ------------------------------------------------


@pytest.mark.parametrize("bos", [False, True])
def test_text_and_prompts_start_as_the_tokenizers_own_call_starts_them(tmp_path: Path, bos: bool) -> None:
    """A tokenizer that puts BOS before a text (Llama 3's) gets it before each plain text and each
    prompt, as ``tokenizer(text)`` and so HF's and TRL's data paths give it; one that adds nothing
    (GPT-2's, Qwen's, the tiny models') gets nothing."""
    from data.stream import special_prefix
    from tests.helpers import bos_tokenizer

    texts = bundled_texts()[:3]
    tokenizer = bos_tokenizer(bundled_texts()[:200])
    if not bos:
        tokenizer.backend_tokenizer.post_processor = None
    assert special_prefix(tokenizer) == ((tokenizer.bos_token_id,) if bos else ())
    plain = write_jsonl(tmp_path / "plain.jsonl", texts)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "Question: who?", "completion": " Tom."}) + "\n")
    for path, whole in ((plain, texts[0]), (qa, "Question: who? Tom.")):
        batch = TokenStream(parse_task_names(str(path)), tokenizer, 256, 0, packing="none").next_batch(1)
        # TRL's SFT tokenises the text with EOS appended: tokenizer(text + eos)
        expected = tokenizer(whole + tokenizer.eos_token)["input_ids"]
        assert batch.input_ids[0, : len(expected)].tolist() == expected
        scored = [t for t in batch.labels[0].tolist() if t != -100]
        if path == qa:  # the completion and its EOS
            assert scored == tokenizer(" Tom.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:  # every token that has one before it: with BOS, the text's first token too
            assert scored == expected[1:]
