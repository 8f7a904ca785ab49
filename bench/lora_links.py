"""Full fine-tuning against LoRA between two replicas over slow links, side by side.

    python bench/lora_links.py [--bandwidths 1000,100,10] [--steps 4] [--lora-rank 8] [--real-link]

Trains a small GPT-NeoX (hidden 256, 4 layers) as two data-parallel replicas of one stage each
on this machine, once per (link bandwidth, mode): full fine-tuning sums every weight's gradient
between the replicas each step, LoRA only the adapters'. Links are emulated with
--link-bandwidth-mbps (5 ms latency), or with --real-link two network namespaces whose veth
pair the kernel shapes to the bandwidth (tc tbf; needs root). Prints the median step time, the
bytes each replica sent to the other per step, full/LoRA ratios, and beside them the limits:
the step time of compute alone (no link) and the time those bytes alone need at that bandwidth.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_model, run  # noqa: E402
from bench.netns import two_hosts  # noqa: E402

log = logging.getLogger("bench.lora_links")
REPLICAS = ["--data-group-size", "2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths", default="1000,100,10", help="link rates in Mbit/s")
    parser.add_argument("--steps", type=int, default=4, help="steps per setting (the first is not timed)")
    parser.add_argument("--lora-rank", type=int, default=8, help="adapter rank (alpha = 2 x rank)")
    parser.add_argument("--real-link", action="store_true", help="two namespaces shaped by tc tbf (root)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    modes = {"full": ["--lr", "1e-3"], "lora": ["--lr", "1e-3", "--lora-rank", str(args.lora_rank)]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        compute = {}
        for name, flags in modes.items():
            rows = run(shards, corpus, folder / f"compute-{name}", args.steps, [*REPLICAS, *flags])
            compute[name] = statistics.median(r["step_time_s"] for r in rows[1:])
            log.info("%s: %d trainable parameters; compute alone (no link) %.3f s/step", name,
                     rows[-1]["trainable_params"], compute[name])  # fmt: skip
        log.info("\n%8s %5s %9s %11s %9s %10s %12s", "Mbit/s", "mode", "step s", "full/lora", "bytes s",
                 "compute s", "dp bytes/step")  # fmt: skip
        for mbps in (float(b) for b in args.bandwidths.split(",")):
            step_s = {}
            for name, flags in modes.items():
                out = folder / f"{name}-{mbps:g}"
                if args.real_link:
                    with two_hosts(rate_mbps=mbps) as hosts:
                        rows = run(shards, corpus, out, args.steps, [*REPLICAS, *flags], hosts)
                else:
                    link = ["--link-bandwidth-mbps", str(mbps), "--link-latency-ms", "5"]
                    rows = run(shards, corpus, out, args.steps, [*REPLICAS, *flags, *link])
                step_s[name] = statistics.median(r["step_time_s"] for r in rows[1:])
                sent = rows[-1]["dp_bytes"]
                ratio = f"{step_s['full'] / step_s[name]:.2f}x" if name == "lora" else ""
                log.info("%8g %5s %9.3f %11s %9.3f %10.3f %12d", mbps, name, step_s[name], ratio,
                         sent * 8 / (mbps * 1e6), compute[name], sent)  # fmt: skip


if __name__ == "__main__":
    main()
