"""``--preview-data N``: print the first N sequences of the stream and exit, without any process group.

One JSON object per line: ``task`` (its file), ``text`` (decoded) and ``loss_tokens`` (how
many of its tokens the loss counts), so a mix can be checked before renting GPUs.
"""

from __future__ import annotations

import json
from typing import TextIO

from trainer.config import DataConfig
from trainer.data import IGNORE_INDEX, TokenStream


def preview(data: DataConfig, tokenizer_name: str, count: int, out: TextIO) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    stream = TokenStream(data.tasks, tokenizer, data.seq_length, data.seed, data.skip_bad_lines)
    for _ in range(count):
        batch = stream.next_batch(1)
        labels = batch.labels[0]
        row = {
            "task": str(data.tasks[batch.tasks[0]].path),
            "text": tokenizer.decode(batch.input_ids[0]),
            "loss_tokens": int((labels[1:] != IGNORE_INDEX).sum()),
        }
        out.write(json.dumps(row) + "\n")
    out.flush()
