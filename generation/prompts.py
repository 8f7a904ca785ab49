"""Prompts as TRL's prompt-only datasets hold them: one JSON record per line with ``prompt``, a
string or a list of ``{"role", "content"}`` messages; every other column is kept beside it.

A string is tokenised as HF's tokenizer call does (its BOS included where it adds one); a list
of messages is rendered by the chat template with the generation prompt (the assistant's turn
opened), and that text tokenised without adding special tokens, as TRL renders a conversational
prompt: the template writes its own.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from data.chat import ChatTemplate


@dataclass(frozen=True)
class Prompt:
    """One record: ``line`` (1-based) of the file, the prompt as given, its tokens, the other columns."""

    line: int
    prompt: str | list[dict]
    ids: tuple[int, ...]
    columns: dict = field(default_factory=dict)


def end_of_sequence_ids(folders: tuple[str | Path, ...], tokenizer: object) -> tuple[int, ...]:
    """Where a completion ends: the ``generation_config.json`` of the model's folders (an
    instruct model lists its end-of-turn token there) and the tokenizer's EOS."""
    ids: set[int] = set()
    for folder in dict.fromkeys(str(f) for f in folders):
        path = Path(folder) / "generation_config.json"
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def _messages(value: list, where: str) -> list[dict]:
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):  # fmt: skip
            raise ValueError(f"{where}: prompt message {i} is not a {{'role': str, 'content': str}} mapping")
    if not value:
        raise ValueError(f"{where}: an empty list of messages is no prompt")
    return value


def prompt_ids(prompt: str | list[dict], tokenizer: object, template: ChatTemplate, where: str) -> list[int]:
    """The tokens a prompt (a string or messages) enters the model as."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if template.template is None:
        raise ValueError(
            f"{where}: a conversational prompt, but the tokenizer has no chat template; pass --chat-template FILE"
        )
    text = tokenizer.apply_chat_template(prompt, chat_template=template.template, tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_prompts(path: Path, tokenizer: object, template: ChatTemplate, max_prompt_tokens: int) -> list[Prompt]:
    """Every record of a jsonl prompts file, tokenised; a record that is no prompt, or one longer
    than ``max_prompt_tokens`` (``--seq-length`` less ``--max-completion-length``), is refused naming
    its line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file (jsonl, one {{'prompt': ...}} per line)")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path} line {line}"
            try:
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or "prompt" not in record:
                raise ValueError(f"{where}: no 'prompt' (a string, or a list of chat messages)")
            prompt = record.pop("prompt")
            if isinstance(prompt, list):
                prompt = _messages(prompt, where)
            elif not isinstance(prompt, str):
                raise ValueError(f"{where}: 'prompt' is a {type(prompt).__name__}; give a string or a list of messages")
            ids = prompt_ids(prompt, tokenizer, template, where)
            if not ids:
                raise ValueError(f"{where}: the prompt has no tokens")
            if len(ids) > max_prompt_tokens:
                raise ValueError(
                    f"{where}: the prompt is {len(ids)} tokens, more than --seq-length less "
                    f"--max-completion-length ({max_prompt_tokens}); shorten it or raise --seq-length"
                )
            prompts.append(Prompt(line, prompt, tuple(ids), record))
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


class PromptStream:
    """The prompts of a run in a shuffled order, a new order each pass over the file (from the
    seed and the pass alone), as TRL's sampler draws them. Its state is how many were drawn."""

    def __init__(self, prompts: list[Prompt], seed: int, generations: int = 1) -> None:
        """``generations``: completions per prompt, so that ``next_batch`` counts completions."""
        self.prompts, self.seed, self.generations = prompts, seed, generations
        self.drawn = 0
        self._order: tuple[int, list[int]] = (-1, [])

    def _shuffled(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def next_prompts(self, count: int) -> list[Prompt]:
        picked = []
        for _ in range(count):
            epoch, at = divmod(self.drawn, len(self.prompts))
            picked.append(self.prompts[self._shuffled(epoch)[at]])
            self.drawn += 1
        return picked

    def next_batch(self, completions: int) -> list[Prompt]:
        """The prompts of ``completions`` completions (the prefetcher's call, as a token stream's)."""
        return self.next_prompts(completions // self.generations)

    def state_dict(self) -> dict:
        return {"prompts_drawn": self.drawn, "packing": "none"}

    def load_state_dict(self, state: dict) -> None:
        if "prompts_drawn" not in state:
            raise ValueError("the checkpoint's data state is not a prompt stream's: resume it with its own --objective")
        self.drawn = state["prompts_drawn"]
