"""File formats, instruction records with loss masking, bad-line skipping and --preview-data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.stream import IGNORE_INDEX, TokenStream, parse_task_names
from tests.helpers import OFFLINE_ENV, ROOT, bundled_texts, instruction_records, write_jsonl, write_zst

SEQ = 24


@pytest.fixture(scope="module")
def tokenizer(tiny_hf: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Instruction records using every accepted completion field name."""
    return instruction_records(bundled_texts()[:30])


def write_records(path: Path, records: list[dict]) -> Path:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def draw(path: Path | str, tokenizer: object, count: int = 40, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The concat stream: every example's tokens back to back, as the expectations below write it."""
    batch = TokenStream(parse_task_names(str(path)), tokenizer, SEQ, seed=3, packing="concat", **kwargs).next_batch(
        count
    )
    return batch.input_ids, batch.labels


def completion_of(record: dict) -> str:
    return next(record[f] for f in ("completion", "generation", "response") if f in record)


def test_loss_mask_covers_exactly_the_completions(tmp_path: Path, tokenizer: object, records: list[dict]) -> None:
    ids, labels = draw(write_records(tmp_path / "qa.jsonl", records), tokenizer)
    # The packed stream, built independently: prompt tokens untrained, completion + EOS trained.
    tokens, trained = [], []
    for record in records * 3:
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(completion_of(record), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        tokens += prompt + completion
        trained += [False] * len(prompt) + [True] * len(completion)
    n = ids.numel()
    assert ids.reshape(-1).tolist() == tokens[:n]
    expected = torch.tensor(tokens[:n]).masked_fill(~torch.tensor(trained[:n]), IGNORE_INDEX)
    assert torch.equal(labels.reshape(-1), expected)
    assert 0 < int((labels != IGNORE_INDEX).sum()) < labels.numel()  # some tokens in, some out


def test_plain_text_trains_on_every_token(tmp_path: Path, tokenizer: object) -> None:
    ids, labels = draw(write_jsonl(tmp_path / "t.jsonl", bundled_texts()[:10]), tokenizer)
    assert torch.equal(ids, labels)


def test_zstd_multi_frame_equals_plain(tmp_path: Path, tokenizer: object, records: list[dict]) -> None:
    plain = draw(write_records(tmp_path / "qa.jsonl", records), tokenizer)
    packed = draw(write_zst(tmp_path / "qa.jsonl.zst", records, frames=4), tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(plain, packed, strict=True))


def test_csv_equals_jsonl(tmp_path: Path, tokenizer: object) -> None:
    rows = [{"prompt": f"Q{i}: {t[:30]}", "response": t[30:]} for i, t in enumerate(bundled_texts()[:20])]
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(rows)
    from_csv = draw(path, tokenizer)
    from_jsonl = draw(write_records(tmp_path / "qa.jsonl", rows), tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(from_csv, from_jsonl, strict=True))


def test_datasets_folder_equals_jsonl(tmp_path: Path, tokenizer: object, records: list[dict]) -> None:
    from datasets import Dataset

    plain = [{"prompt": r["prompt"], "completion": completion_of(r)} for r in records]
    Dataset.from_list(plain).save_to_disk(str(tmp_path / "saved"))
    from_dataset = draw(tmp_path / "saved", tokenizer)
    from_jsonl = draw(write_records(tmp_path / "qa.jsonl", plain), tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(from_dataset, from_jsonl, strict=True))


def test_resume_inside_a_zstd_file(tmp_path: Path, tokenizer: object, records: list[dict]) -> None:
    path = write_zst(tmp_path / "qa.jsonl.zst", records)
    whole = TokenStream(parse_task_names(str(path)), tokenizer, SEQ, seed=3).next_batch(60)
    head = TokenStream(parse_task_names(str(path)), tokenizer, SEQ, seed=3)
    head.next_batch(23)
    tail = TokenStream(parse_task_names(str(path)), tokenizer, SEQ, seed=3)
    tail.load_state_dict(json.loads(json.dumps(head.state_dict())))
    rest = tail.next_batch(37)
    assert torch.equal(rest.input_ids, whole.input_ids[23:]) and torch.equal(rest.labels, whole.labels[23:])


def test_missing_fields_name_the_line_and_the_fields_expected(tmp_path: Path, tokenizer: object) -> None:
    path = write_records(tmp_path / "qa.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "only a prompt"}])
    with pytest.raises(ValueError) as exc:
        draw(path, tokenizer)
    message = str(exc.value)
    assert f"{path}:2" in message and "'text'" in message and "'completion'" in message and "'prompt'" in message


def test_skip_bad_lines_skips_and_counts(tmp_path: Path, tokenizer: object) -> None:
    texts = bundled_texts()[:6]
    good = write_jsonl(tmp_path / "good.jsonl", texts)
    lines = good.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", lines[1], '{"title": "no text"}', *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:2"):
        draw(bad, tokenizer)
    stream = TokenStream(parse_task_names(str(bad)), tokenizer, SEQ, seed=3, skip_bad_lines=True, packing="concat")
    skipped = stream.next_batch(40)
    assert torch.equal(skipped.input_ids, draw(good, tokenizer)[0])
    (task_state,) = stream.state_dict()["tasks"].values()
    assert task_state["source"]["bad_lines"] >= 2  # counted (once per pass over the file)


def test_preview_prints_sequences_without_a_process_group(
    tiny_shards: Path, tmp_path: Path, records: list[dict], tokenizer: object
) -> None:
    text = write_jsonl(tmp_path / "text.jsonl", bundled_texts()[:40])
    qa = write_records(tmp_path / "qa.jsonl", records)
    cmd = [sys.executable, str(ROOT / "dist_clm_train.py"), "--preview-data", "12", "--model-name", str(tiny_shards),
           "--task-name", f"{text}:0.5,{qa}:0.5", "--seq-length", str(SEQ)]  # fmt: skip
    # no --rank and no master: preview must not need them
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**OFFLINE_ENV, "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 12 and {r["task"] for r in rows} == {str(text), str(qa)}
    keys = {"task", "text", "loss_tokens", "input_ids", "labels", "lengths"}
    assert all(set(row) == keys and row["text"] for row in rows)
    # exactly the stream's first sequences, as the first steps train on them
    first = TokenStream(parse_task_names(f"{text}:0.5,{qa}:0.5"), tokenizer, SEQ, seed=42).next_batch(12)
    assert [r["input_ids"] for r in rows] == first.input_ids.tolist()
    assert [r["labels"] for r in rows] == first.labels.tolist()
    assert [r["lengths"] for r in rows] == [first.lengths(i) for i in range(12)]
    assert all(sum(r["lengths"]) == SEQ for r in rows)
    # plain text: every token but the first is predicted; instructions: prompts are not trained on
    assert {r["loss_tokens"] for r in rows if r["task"] == str(text)} == {SEQ - 1}
    qa_counts = [r["loss_tokens"] for r in rows if r["task"] == str(qa)]
    assert all(0 <= n <= SEQ - 1 for n in qa_counts) and min(qa_counts) < SEQ - 1
