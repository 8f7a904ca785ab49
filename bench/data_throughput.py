"""How fast the data path makes tokens, next to how fast training eats them, on one core.

    python bench/data_throughput.py [--seq-length 2048] [--sequences 200]

Builds a 4096-entry byte-level BPE tokenizer and two tasks (plain text jsonl and instruction
records in jsonl.zst) offline, then times, pinned to one core with one thread:
  data     TokenStream.next_batch: read, tokenise in batches, pack, mask, sample by weight
  trainer  one optimizer step (forward, backward, AdamW) of the tiny quickstart GPT-NeoX
and prints both rates and their ratio. A real model consumes far fewer tokens per second
than the tiny one, so the ratio printed is a lower bound on the data path's headroom.
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
from modules import family_for
from pipeline.stage import Stage
from trainer.data import TokenStream, parse_task_names
from trainer.loss import token_loss

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


def time_data(spec: str, tokenizer: object, seq: int, sequences: int, repeats: int) -> float:
    rates = []
    for r in range(repeats):
        stream = TokenStream(parse_task_names(spec), tokenizer, seq, seed=r)
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
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_tasks(Path(tmp), texts)
        data = time_data(spec, tokenizer, args.seq_length, args.sequences, args.repeats)
    trainer = time_trainer(len(tokenizer), min(args.seq_length, 512), batch=8, repeats=args.repeats)
    log.info("data path (sample + tokenise + pack), 1 core: %10.0f tokens/s", data)
    log.info("trainer step, tiny 4-layer GPT-NeoX, 1 core:  %10.0f tokens/s", trainer)
    log.info("ratio data / trainer:                         %10.1fx", data / trainer)


if __name__ == "__main__":
    main()
