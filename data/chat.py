"""Conversations through the model's own chat template, trained on the assistant's turns only.

A conversation is rendered exactly as the tokenizer's ``chat_template`` (or ``--chat-template
FILE``) renders it for HF, TRL and the model's users; its tokens are context, except those the
template renders as an assistant turn, up to and including the end-of-turn token that closes
it (the model must learn to stop). The assistant's tokens are found in one of two ways:

- the template marks them (``{% generation %} ... {% endgeneration %}``): HF's assistant-token
  mask, with the closing special token added where the block leaves it outside;
- otherwise by rendering growing prefixes: turn i of the assistant is what the template adds
  between the first i turns with the generation prompt and the first i + 1 turns, which works
  for every template that renders each turn on its own. A template for which those renderings
  are not each the beginning of the whole (one that rewrites earlier turns depending on later
  ones) is refused, naming it: its turns cannot be told apart.
"""

from __future__ import annotations

import hashlib
import re

from jinja2 import TemplateError

from data.sources import Conversation

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplate:
    """Renders conversations to (tokens, targets); ``targets`` is 1 where a token is trained."""

    def __init__(self, tokenizer: object, template: str | None = None, name: str = "") -> None:
        self.tokenizer = tokenizer
        self.template = template if template is not None else getattr(tokenizer, "chat_template", None)
        self.name = name or ("--chat-template" if template is not None else "the tokenizer's chat template")
        self.marked = self.template is not None and bool(_GENERATION_BLOCK.search(self.template))
        special = set(getattr(tokenizer, "all_special_ids", []))
        special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
        self.special_ids = special
        self.used = False  # whether a conversation was rendered (the template then shaped the stream)

    def fingerprint(self) -> str | None:
        """A short hash of the template text, which a checkpoint's data state records (None: no template)."""
        return hashlib.sha256(self.template.encode()).hexdigest()[:16] if self.template is not None else None

    def encode(self, conversation: Conversation, trained_from: int = 0) -> tuple[list[int], list[int]]:
        """``trained_from``: the first turn whose assistant tokens are trained (a preference
        pair's response follows its prompt turns, which are context, assistant turns included)."""
        where = conversation.where
        if self.template is None:
            raise ValueError(
                f"{where}: a conversation, but the tokenizer has no chat template; pass --chat-template FILE "
                "(a Jinja chat template, as in a tokenizer_config.json)"
            )
        messages = [{"role": role, "content": content} for role, content in conversation.messages]
        self.used = True
        try:
            if self.marked:
                tokens, targets = self._marked(messages, trained_from)
            else:
                tokens, targets = self._by_prefixes(messages, where, trained_from)
        except TemplateError as err:  # the template's own raise_exception (e.g. roles out of order) included
            raise ValueError(f"{where}: {self.name} cannot render this conversation: {err}") from None
        if not any(targets):
            raise ValueError(f"{where}: {self.name} rendered no assistant tokens for this conversation")
        return tokens, targets

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _by_prefixes(self, messages: list[dict], where: str, trained_from: int) -> tuple[list[int], list[int]]:
        whole = self._render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < trained_from:
                continue
            through = self._render(messages[: i + 1], False)
            before = self._render(messages[:i], True) if i else self._opening()
            if not (whole.startswith(through) and through.startswith(before)):
                raise ValueError(
                    f"{where}: {self.name} renders the first {i + 1} turns of this conversation as something "
                    "other than the beginning of the whole conversation, so its assistant turns cannot be told "
                    "apart; use a template that renders each turn on its own, or mark the assistant's part "
                    "with {% generation %}...{% endgeneration %}"
                )
            # the turn's text with its closing token; the whitespace after that is the next turn's layout
            spans.append((len(before), len(through.rstrip())))
        encoded = self.tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in encoded["offset_mapping"]]
        targets = [int(any(a <= start < b for a, b in spans)) for start in starts]
        return list(encoded["input_ids"]), targets

    def _opening(self) -> str:
        """What the template renders before the text of an assistant turn that opens a
        conversation (HF renders no empty conversation to ask): what two openings that differ
        from their first character share, a default system prompt included."""
        first, second = (self._render([{"role": "assistant", "content": text}], False) for text in ("\x01", "\x02"))
        shared = 0
        while shared < min(len(first), len(second)) and first[shared] == second[shared]:
            shared += 1
        return first[:shared]

    def _marked(self, messages: list[dict], trained_from: int) -> tuple[list[int], list[int]]:
        out = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        tokens, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if trained_from:  # the turns before are context: the tokens of their rendering with the generation prompt
            context = self.tokenizer.apply_chat_template(
                messages[:trained_from], chat_template=self.template, tokenize=True, add_generation_prompt=True,
                return_dict=True,
            )["input_ids"]  # fmt: skip
            mask[: len(context)] = [0] * min(len(context), len(mask))
        # a generation block that stops before the turn's closing token (<|im_end|>, <|eot_id|>,
        # <end_of_turn>): that token is trained too, or the model never learns to stop
        closing = [k for k in range(1, len(tokens)) if mask[k - 1] and not mask[k] and tokens[k] in self.special_ids]
        for k in closing:
            mask[k] = 1
        return tokens, mask
