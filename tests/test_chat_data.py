"""Conversations through a chat template: the trained tokens are exactly the assistant's turns.

A tiny tokenizer gets ChatML's control tokens and two templates written here: one marking the
assistant's part with ``{% generation %}`` (ending before the closing ``<|im_end|>``, which must
still be trained), one unmarked (split by rendering growing prefixes). The expected trained text
is written out by hand, not derived from the code under test. The real SmolLM2 template is
checked in tests/test_real_model.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert.to_hf import convert_to_hf
from data.chat import ChatTemplate
from data.sources import Conversation, Source, example_from_record
from data.stream import IGNORE_INDEX, TokenStream, parse_task_names
from tests.helpers import (
    OFFLINE_ENV,
    ROOT,
    SEED,
    assert_all_ok,
    launch,
    load_hf_state,
    read_metrics,
    resume_elsewhere,
    train_args,
)

CHATML_MARKED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML = CHATML_MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
MULTI_TURN = (
    ("system", "Answer briefly."),
    ("user", "Hi there"),
    ("assistant", "Hello! How can I help?"),
    ("user", "What is the weather in Lima?"),
    ("tool", "sunny, 20 C"),
    ("assistant", "It is sunny in Lima."),
)


@pytest.fixture(scope="module")
def tokenizer(tiny_hf: Path) -> object:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def trained_runs(tokenizer: object, tokens: list[int], targets: list[int]) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, run = [], []
    for token, trained in zip([*tokens, None], [*targets, 0], strict=True):
        if trained:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


@pytest.mark.parametrize("template", [CHATML_MARKED, CHATML], ids=["generation-marked", "by-prefixes"])
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_trained_tokens_are_the_assistant_turns_with_their_closing_token(
    tokenizer: object, template: str, system: bool
) -> None:
    turns = MULTI_TURN if system else MULTI_TURN[1:]
    tokens, targets = ChatTemplate(tokenizer, template).encode(Conversation(turns, "chat.jsonl:1"))
    assert trained_runs(tokenizer, tokens, targets) == [
        "Hello! How can I help?<|im_end|>",
        "It is sunny in Lima.<|im_end|>",
    ]
    # the tokens are the template's own rendering, context included (the tool turn too)
    rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], chat_template=template,
                                             tokenize=False)  # fmt: skip
    assert tokenizer.decode(tokens) == rendered and "<|im_start|>tool\nsunny, 20 C<|im_end|>" in rendered
    assert tokens == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_it(tokenizer: object) -> None:
    """This template numbers every turn out of the total, so the first turns render differently
    alone than inside the whole: its assistant turns cannot be located."""
    counting = "{% for m in messages %}[{{ loop.index }}/{{ messages|length }}] {{ m['content'] }}\n{% endfor %}"
    chat = ChatTemplate(tokenizer, counting)
    with pytest.raises(ValueError, match=r"chat.jsonl:4: --chat-template renders the first 2 turns .* cannot be told"):
        chat.encode(Conversation((("user", "a"), ("assistant", "b"), ("user", "c")), "chat.jsonl:4"))


def test_no_template_is_refused_with_the_flag_to_pass(tokenizer: object) -> None:
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match=r"data.jsonl:2: a conversation, but the tokenizer has no chat template; "
                                         r"pass --chat-template FILE"):  # fmt: skip
        ChatTemplate(tokenizer).encode(Conversation((("user", "a"), ("assistant", "b")), "data.jsonl:2"))


def test_sharegpt_and_alpaca_are_conversations() -> None:
    messages = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                             {"role": "assistant", "content": "A"}]}  # fmt: skip
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}]}  # fmt: skip
    assert example_from_record(sharegpt, "x") == example_from_record(messages, "x")
    alpaca = {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"}
    assert example_from_record(alpaca, "x").messages == (
        ("user", "Translate to French.\ncheese"),
        ("assistant", "fromage"),
    )
    no_input = {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."}
    assert example_from_record(no_input, "x").messages == (
        ("system", "Be kind."),
        ("user", "Say hi."),
        ("assistant", "hi"),
    )


BAD_RECORDS = [
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "turn 1 has unknown role 'narrator'; expected one of"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
     "turn 1's content is a JSON list, not a string"),
    ({"messages": []}, "empty conversation"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "the conversation has no assistant turn"),
    ({"conversations": [{"from": "gpt", "value": 3}]}, "turn 1's value is a JSON int, not a string"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "problem"), BAD_RECORDS)
def test_a_bad_conversation_names_its_line_and_problem(tmp_path: Path, record: dict, problem: str) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: {problem}"):
        Source(path).read(2)
    skipping = Source(path, skip_bad_lines=True)
    assert skipping.read(3) == [example_from_record(good, "")] * 3 and skipping.bad_lines >= 1


def chat_file(path: Path, count: int = 20) -> Path:
    with open(path, "w") as f:
        for n in range(count):
            turns = [{"role": "user", "content": f"What is {n} plus {n}?"},
                     {"role": "assistant", "content": f"{n} plus {n} is {2 * n}."}]  # fmt: skip
            if n % 3 == 0:
                turns += [{"role": "user", "content": "And times two?"},
                          {"role": "assistant", "content": f"That is {4 * n}."}]  # fmt: skip
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def test_chat_stream_resumes_bit_exactly_mid_epoch(tmp_path: Path, tokenizer: object) -> None:
    tasks = parse_task_names(f"{chat_file(tmp_path / 'chat.jsonl')}:0.7,{ROOT / 'example_scripts/data/tiny.jsonl'}:0.3")
    whole = TokenStream(tasks, tokenizer, 32, seed=3, chat_template=CHATML).next_batch(30)
    head = TokenStream(tasks, tokenizer, 32, seed=3, chat_template=CHATML)
    head.next_batch(11)
    tail = TokenStream(tasks, tokenizer, 32, seed=3, chat_template=CHATML)
    tail.load_state_dict(json.loads(json.dumps(head.state_dict())))
    rest = tail.next_batch(19)
    assert torch.equal(rest.input_ids, whole.input_ids[11:]) and torch.equal(rest.labels, whole.labels[11:])
    assert (whole.labels != IGNORE_INDEX).any() and (whole.labels == IGNORE_INDEX).any()
    other = TokenStream(tasks, tokenizer, 32, seed=3, chat_template=CHATML_MARKED)  # renders the same, but another
    with pytest.raises(ValueError, match="rendered conversations with another chat template"):
        other.load_state_dict(head.state_dict())


@pytest.mark.ranks
def test_chat_preview_feeds_hf_the_first_step_and_a_resume_is_exact(
    tiny_hf: Path, tiny_shards: Path, tmp_path: Path, tokenizer: object
) -> None:
    """--chat-template FILE over a tokenizer without one: the preview shows the assistant turns
    marked, and its input_ids and labels, fed to HF's own model, give the trainer's first loss.
    The run's step-5 checkpoint (mid-epoch, conversations packed as documents) resumed in one
    process ends where the run ended."""
    from transformers import AutoModelForCausalLM

    data, template = chat_file(tmp_path / "chat.jsonl"), tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    base = ["--model-name", str(tiny_shards), "--task-name", str(data), "--seq-length", "256", "--seed", str(SEED),
            "--chat-template", str(template)]  # fmt: skip
    env = {**OFFLINE_ENV, "PATH": ""}
    cmd = [sys.executable, str(ROOT / "dist_clm_train.py"), *base, "--preview-data", "4"]
    rows = [json.loads(line) for line in subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                                                        check=True).stdout.splitlines()]  # fmt: skip
    shown = subprocess.run([*cmd, "--preview-format", "text"], capture_output=True, text=True, env=env, timeout=120,
                           check=True).stdout  # fmt: skip
    assert "[[0 plus 0 is 0.<|im_end|>]]" in shown and "user\nWhat is 1 plus 1?<|im_end|>" in shown

    ckpt = tmp_path / "ckpt"
    args = train_args(tiny_shards, str(data), ckpt, pp=2, dp=1, batch=4, micro=2, accum=1)
    flags = ("--seq-length", "256", "--chat-template", str(template))
    assert_all_ok(launch([*args, *flags], 2, tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_hf)
    ids, labels = torch.tensor([r["input_ids"] for r in rows]), torch.tensor([r["labels"] for r in rows])
    positions = torch.tensor([[p for n in r["lengths"] for p in range(n)] for r in rows])
    assert any(len(r["lengths"]) > 2 for r in rows)  # several conversations a sequence, kept apart
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss.item()
    first = next(r["loss"] for r in read_metrics(ckpt) if "loss" in r)
    assert first == pytest.approx(hf_loss, abs=1e-5)
    final = load_hf_state(convert_to_hf(ckpt, tmp_path / "final"))
    resume_elsewhere(tiny_shards, str(data), ckpt, final, tmp_path / "resumed", flags)


def test_parquet_conversations_equal_jsonl_and_resume(tmp_path: Path, tokenizer: object) -> None:
    """ShareGPT records in a parquet file (a list-of-structs column) draw the same stream as the
    same records in jsonl, and a resume part-way skips exactly the rows consumed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"conversations": [{"from": "human", "value": f"Name a number above {n}."},
                                  {"from": "gpt", "value": f"{n + 1}, for one."}]} for n in range(40)]  # fmt: skip
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=7)

    def stream(path: Path) -> TokenStream:
        return TokenStream(parse_task_names(str(path)), tokenizer, 32, seed=5, chat_template=CHATML)

    whole = stream(jsonl).next_batch(40)
    assert torch.equal(stream(parquet).next_batch(40).input_ids, whole.input_ids)
    head = stream(parquet)
    head.next_batch(17)
    tail = stream(parquet)
    tail.load_state_dict(head.state_dict())
    rest = tail.next_batch(23)
    assert torch.equal(rest.input_ids, whole.input_ids[17:]) and torch.equal(rest.labels, whole.labels[17:])


def test_an_assistant_first_conversation(tokenizer: object) -> None:
    """Opening with the assistant: its turn is trained from its text on, and what the template
    renders before it (a default system prompt, as SmolLM2's and Qwen's templates add, and the
    assistant's header) stays context."""
    opening = Conversation((("assistant", "Welcome!"), ("user", "Hi"), ("assistant", "Hello.")), "chat.jsonl:7")
    default_system = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe helpful.<|im_end|>\n{% endif %}" + CHATML
    )
    for template in (CHATML, default_system):
        tokens, targets = ChatTemplate(tokenizer, template).encode(opening)
        assert trained_runs(tokenizer, tokens, targets) == ["Welcome!<|im_end|>", "Hello.<|im_end|>"]


def test_a_conversation_the_template_rejects_is_skipped_and_counted(tmp_path: Path, tokenizer: object) -> None:
    """A template's own raise_exception (roles out of order) names the line; --skip-bad-lines
    skips and counts it, and the stream goes on with the other conversations."""
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{% endfor %}" + CHATML
    )
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "b"}]}  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good)))
    with pytest.raises(
        ValueError, match=rf"{path}:2: .*roles must alternate.*; fix the record or pass --skip-bad-lines"
    ):
        TokenStream(parse_task_names(str(path)), tokenizer, 32, seed=1, chat_template=strict).next_batch(2)
    stream = TokenStream(parse_task_names(str(path)), tokenizer, 32, seed=1, skip_bad_lines=True, chat_template=strict)
    batch = stream.next_batch(4)
    assert (batch.labels != IGNORE_INDEX).any()
    (task,) = stream.state_dict()["tasks"].values()
    assert task["source"]["bad_lines"] >= 1


def test_only_a_stream_that_rendered_conversations_records_its_template(tmp_path: Path, tokenizer: object) -> None:
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain words only"}) + "\n")
    plain = TokenStream(parse_task_names(str(text)), tokenizer, 32, seed=1, chat_template=CHATML)
    plain.next_batch(2)
    assert plain.state_dict()["chat_template"] is None
    TokenStream(parse_task_names(str(text)), tokenizer, 32, seed=1).load_state_dict(plain.state_dict())  # accepted
