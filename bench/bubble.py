"""Measured pipeline bubble against GPipe's (p-1)/(m+p-1), for GPipe and 1F1B.

    python bench/bubble.py [--micro-batches 2,4,8]

Runs 2 stages (one rank per core) with --profiling tidy_profiling for each number of
micro-batches m and prints the bubble from trace/summary.json beside the theory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_model, run  # noqa: E402

log = logging.getLogger("bench.bubble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batches", default="2,4,8", help="values of m to measure")
    parser.add_argument("--steps", type=int, default=5, help="steps per run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    log.info("%6s %3s %10s %10s", "mode", "m", "measured", "theory")
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_model(Path(tmp), corpus)
        for mode in ("gpipe", "1f1b"):
            for m in (int(v) for v in args.micro_batches.split(",")):
                out = Path(tmp) / f"{mode}-{m}"
                flags = ["--pipeline-group-size", "2", "--pp-mode", mode, "--batch-size", str(2 * m),
                         "--profiling", "tidy_profiling"]  # fmt: skip
                run(shards, corpus, out, args.steps, flags)
                summary = json.loads((out / "trace" / "summary.json").read_text())
                log.info("%6s %3d %10.3f %10.3f", mode, m, summary["bubble_fraction"], summary["bubble_theory_gpipe"])


if __name__ == "__main__":
    main()
