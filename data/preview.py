"""``--preview-data N``: print the first N sequences of the stream and exit, without any process group.

``--preview-format json`` (default): one JSON object per line: ``task`` (its file), ``text``
(decoded), ``loss_tokens`` (how many of its tokens the loss counts), and ``input_ids`` and
``labels`` (-100 where a token is not trained), exactly what the first steps train on, and
``lengths``, the blocks its positions restart at (its examples, and any padding).
Under ``--objective dpo`` each of the N is a pair: its chosen and its rejected sequence, each row
naming its ``response`` and the pair's ``record`` line.
``--preview-format text``: each sequence as text, the trained tokens inside ``[[ ]]`` (in
colour on a terminal), so a mix and its chat masking can be checked before renting GPUs.
"""

from __future__ import annotations

import json
from typing import TextIO

import torch

from data.config import DataConfig
from data.stream import IGNORE_INDEX, TokenStream

TRAINED_COLOUR, PLAIN = "\033[1;32m", "\033[0m"


def preview(
    data: DataConfig, tokenizer_name: str, count: int, out: TextIO, form: str = "json", pairs: bool = False
) -> None:
    """``pairs`` (--objective dpo): N preference pairs, each as its chosen and its rejected sequence
    (rows say which, and the pair's record line)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    packing = "none" if pairs else data.packing
    stream = TokenStream(data.tasks, tokenizer, data.seq_length, data.seed, data.skip_bad_lines, data.chat_template,
                         packing, pairs=pairs, truncation=data.pair_truncation)  # fmt: skip
    colour = out.isatty()
    for n in range(count):
        batch = stream.next_batch(2 if pairs else 1)
        for k, response in enumerate(("chosen", "rejected") if pairs else (None,)):
            ids, labels = batch.input_ids[k], batch.labels[k]
            task = str(data.tasks[batch.tasks[k]].path)
            if form == "text":
                name = f"pair {n + 1}, {response}" if pairs else f"sequence {n + 1}"
                out.write(f"--- {name} ({task}) ---\n{marked_text(tokenizer, ids, labels, colour)}\n")
                continue
            row = {
                "task": task,
                "text": tokenizer.decode(ids),
                "loss_tokens": int((labels[1:] != IGNORE_INDEX).sum()),
                "input_ids": ids.tolist(),
                "labels": labels.tolist(),
                "lengths": batch.lengths(k),  # its examples (and padding), as the positions restart
            }
            if pairs:
                row.update(response=response, record=batch.records[k])
            out.write(json.dumps(row) + "\n")
    out.flush()


def marked_text(tokenizer: object, ids: torch.Tensor, labels: torch.Tensor, colour: bool = False) -> str:
    """The sequence decoded run by run, each run of trained tokens inside ``[[ ]]`` (or coloured)."""
    trained = (labels != IGNORE_INDEX).tolist()
    pieces, start = [], 0
    for end in range(1, len(trained) + 1):
        if end == len(trained) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end])
            if trained[start]:
                text = f"{TRAINED_COLOUR}{text}{PLAIN}" if colour else f"[[{text}]]"
            pieces.append(text)
            start = end
    return "".join(pieces)
