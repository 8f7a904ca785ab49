"""How fast the data path makes tokens, next to how fast training eats them, on one core.

    python bench/data_throughput.py [--seq-length 2048] [--sequences 200]

Builds a 4096-entry byte-level BPE tokenizer and three tasks (plain text jsonl, instruction
records in jsonl.zst, and chat conversations) offline, then times, pinned to one core with one
thread:
  data     TokenStream.next_batch: read, tokenise in batches (conversations one by one through a
           ChatML template, their assistant turns found by rendering growing prefixes), pack
           (--packing concat, and documents with its positions and padding), mask, sample by weight
  trainer  one optimizer step (forward, backward, AdamW) of the tiny quickstart GPT-NeoX
and prints the rates and their ratios. A real model consumes far fewer tokens per second than
the tiny one, so the ratios printed are lower bounds on the data path's headroom.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from convert.tiny_model import tiny_config, train_tokenizer
from data.stream import TokenStream, parse_task_names
from modules import family_for
from objectives.loss import token_loss
from pipeline.stage import Stage

log = logging.getLogger("bench.data_throughput")


def synthetic_corpus(seed: int, docs: int) -> list[str]:
    """Documents of 50-400 words drawn from the bundled corpus's vocabulary."""
    root = Path(__file__).resolve().parent.parent
    with open(root / "example_scripts" / "data" / "tiny.jsonl") as f:
        words = sorted({w for line in f for w in json.loads(line)["text"].split()})
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(50, 400))) for _ in range(docs)]


def write_tasks(folder: Path, texts: list[str]) -> str:
    import zstandard

    half = len(texts) // 2
    plain = folder / "text.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:half]))
    qa = folder / "qa.jsonl.zst"
    lines = "".join(json.dumps({"prompt": t[:200], "completion": t[200:]}) + "\n" for t in texts[half:])
    qa.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return f"{plain}:0.7,{qa}:0.3"


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_chat(folder: Path, texts: list[str]) -> str:
    """Conversations of one or two exchanges: a question from a text's first words, the rest as answers."""
    path = folder / "chat.jsonl"
    with open(path, "w") as f:
        for n, text in enumerate(texts):
            words = text.split()
            turns = [{"role": "system", "content": "Answer in full sentences."},
                     {"role": "user", "content": " ".join(words[:12]) + "?"},
                     {"role": "assistant", "content": " ".join(words[12:])}]  # fmt: skip
            if n % 2:
                turns += [{"role": "user", "content": "Say it shorter."},
                          {"role": "assistant", "content": " ".join(words[12:40])}]  # fmt: skip
            f.write(json.dumps({"messages": turns}) + "\n")
    return str(path)


def time_data(
    spec: str, tokenizer: object, seq: int, sequences: int, repeats: int, packing: str, chat: str | None = None
) -> float:
    rates = []
    for r in range(repeats):
        stream = TokenStream(parse_task_names(spec), tokenizer, seq, seed=r, chat_template=chat, packing=packing)
        started = time.perf_counter()
        stream.next_batch(sequences)
        rates.append(sequences * seq / (time.perf_counter() - started))
    return statistics.median(rates)


def time_trainer(vocab: int, seq: int, batch: int, repeats: int) -> float:
    config = tiny_config("gptneox", vocab, num_layers=4)
    config._attn_implementation = "sdpa"
    stage = Stage(family_for("gptneox"), config, range(4), is_first=True, is_last=True)
    stage.init_parts(0.02, seed=0)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))
    rates = []
    for _ in range(repeats + 1):  # the first step warms up
        started = time.perf_counter()
        loss = token_loss(stage(ids), ids, ids[:, 1:].numel())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rates.append(batch * seq / (time.perf_counter() - started))
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=200, help="sequences drawn per data measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements; the median is reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, one thread
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    texts = synthetic_corpus(seed=0, docs=4000)
    tokenizer = train_tokenizer(texts[:500], vocab_size=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec, chat = write_tasks(Path(tmp), texts), write_chat(Path(tmp), texts[:2000])
        for packing in ("concat", "documents"):
            rate = time_data(spec, tokenizer, args.seq_length, args.sequences, args.repeats, packing)
            measured[f"text + instructions, --packing {packing}"] = rate
        measured["chat template + --packing documents"] = time_data(
            chat, tokenizer, args.seq_length, args.sequences, args.repeats, "documents", CHATML
        )
    trainer = time_trainer(len(tokenizer), min(args.seq_length, 512), batch=8, repeats=args.repeats)
    log.info("seq %d, 1 core, tokens/s (ratio to the trainer's step rate)", args.seq_length)
    for what, rate in measured.items():
        log.info("  data: %-40s %10.0f  (%5.1fx)", what, rate, rate / trainer)
    log.info("  trainer step, tiny 4-layer GPT-NeoX:          %10.0f", trainer)


if __name__ == "__main__":
    main()
