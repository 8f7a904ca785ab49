"""DPO against next-token training of the same sequences through the same pipeline, side by side.

    python bench/dpo.py [--steps 8] [--lora-rank 0]

Builds a small GPT-NeoX (hidden 256, 4 layers) and preference pairs from the bundled corpus (a
text's first half as the prompt, its rest chosen, another text's rest rejected), and trains it
on two pipeline stages (one rank per core): as next-token training on 8 sequences a step, and
with --objective dpo on the very same sequences as 4 pairs a step (each pair's prompt with each
response, as prompt/completion records, --packing none: the same tokens and the same scored
ones), with the reference precomputed (once, before the first step, timed apart) and with
--dpo-reference frozen (a forward of a frozen copy in each step; under --lora-rank the adapters
switched off instead). Prints the median step time of each, the ratios to next-token training,
and the bytes on the pipeline link per pair.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_model, run  # noqa: E402
from convert.tiny_model import read_texts  # noqa: E402

log = logging.getLogger("bench.dpo")
PIPELINE = ["--pipeline-group-size", "2", "--seq-length", "128"]


def write_data(corpus: Path, folder: Path) -> tuple[Path, Path, int]:
    """The pairs, and the same sequences as prompt/completion records (chosen, then rejected)."""
    texts = read_texts(corpus)
    pairs, sequences = folder / "pairs.jsonl", folder / "sequences.jsonl"
    with open(pairs, "w") as p, open(sequences, "w") as s:
        for i, text in enumerate(texts):
            cut, other = len(text) // 2, texts[(i + 5) % len(texts)]
            prompt, chosen, rejected = text[:cut], text[cut:], other[len(other) // 2 :]
            p.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            for response in (chosen, rejected):
                s.write(json.dumps({"prompt": prompt, "completion": response}) + "\n")
    return pairs, sequences, len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first is not timed)")
    parser.add_argument("--lora-rank", type=int, default=0, help="adapter rank (0: full fine-tuning)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    lora = ["--lora-rank", str(args.lora_rank)] if args.lora_rank else []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        pairs, sequences, count = write_data(corpus, folder)
        lm = ["--task-name", str(sequences), "--packing", "none", "--batch-size", "8", "--micro-batch-size", "2"]
        dpo = ["--task-name", str(pairs), "--objective", "dpo", "--batch-size", "4", "--micro-batch-size", "1"]
        step_s, link = {}, {}
        frozen = [*dpo, "--dpo-reference", "frozen"]
        for name, flags in (("lm", lm), ("dpo", dpo), ("dpo-frozen", frozen)):
            started = time.perf_counter()
            rows = run(shards, corpus, folder / name, args.steps, [*PIPELINE, *lora, *flags], pin=True)
            total = time.perf_counter() - started
            step_s[name] = statistics.median(r["step_time_s"] for r in rows[1:])
            link[name] = rows[-1]["comm_bytes"] / 4  # 4 pairs (8 sequences) a step
            log.info("%s: median step %.4f s; %d pipeline bytes per pair; whole run %.1f s (start-up included%s)",
                     name, step_s[name], link[name], total,
                     f", the reference pass over {count} pairs" if name == "dpo" else "")  # fmt: skip
        log.info("DPO / next-token step time on the same sequences: %.3fx (goal <= 1.15x); pipeline bytes per pair "
                 "%d (next-token: %d for the same two sequences)", step_s["dpo"] / step_s["lm"], link["dpo"],
                 link["lm"])  # fmt: skip
        log.info("DPO with the reference forward in each step (--dpo-reference frozen): %.3fx next-token's step, "
                 "%d pipeline bytes per pair", step_s["dpo-frozen"] / step_s["lm"], link["dpo-frozen"])  # fmt: skip


if __name__ == "__main__":
    main()
