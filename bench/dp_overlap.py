"""Gradient sums between replicas overlapped with the last backward (--dp-bucket-mb) against one
sum after the step (--dp-bucket-mb 0), side by side over slow links.

    python bench/dp_overlap.py [--bandwidths 1000,300,100] [--bucket-mb 2] [--steps 12] [--rounds 2]

Trains bench/common.py's model (hidden 256, 4 layers: 13.6 MB of fp32 gradients) on 2 replicas
of one stage each (8 sequences of 256 tokens each, in one micro-batch), each rank pinned to its own core,
holding what a rank sends to the other replica to the bandwidth (--link-bandwidth-mbps, 1 ms
latency: the lane thread that sums the buckets waits, so the wait overlaps compute as a real
link's transfer would), or with --real-link over two network namespaces whose veth pair the
kernel shapes to the bandwidth (tc tbf; needs root). Rounds alternate which setting runs first.
Prints per bandwidth the median step time of both, their ratio (median over rounds of the ratio
within a round), and the limits beside them: compute alone (one replica's work on one rank, no
sum at all), the bytes' time at
that bandwidth, and the best overlap could do, max(compute, compute - backward + bytes' time),
taking the backward as 2/3 of compute.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_model, link_parser, run  # noqa: E402
from bench.netns import two_hosts  # noqa: E402

log = logging.getLogger("bench.dp_overlap")
# one micro-batch of 8 per replica (--batch-size is a replica's): the last backward is the whole
# backward (with m micro-batches only the last one's backward can hide the sum)
REPLICAS = ["--data-group-size", "2", "--micro-batch-size", "8"]


def median_step(rows: list[dict]) -> float:
    return statistics.median(r["step_time_s"] for r in rows[1:])  # the first step warms up


def main() -> None:
    parser = link_parser(__doc__, "1000,300,100", 12, "between the replicas")
    parser.add_argument("--bucket-mb", type=float, default=2.0, help="--dp-bucket-mb of the overlapped runs")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each setting per bandwidth")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    settings = {"after the step": ["--dp-bucket-mb", "0"], "overlapped": ["--dp-bucket-mb", str(args.bucket_mb)]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        # --batch-size is a replica's: one rank alone does exactly one replica's work
        compute_s = median_step(run(shards, corpus, folder / "compute", args.steps, REPLICAS[2:], pin=True))
        log.info("one replica's compute alone: %.3f s/step\n", compute_s)
        header = ("Mbit/s", "after s", "overlap s", "ratio", "compute s", "bytes s", "best s", "losses equal")
        log.info("%7s %9s %10s %7s %10s %8s %7s %13s", *header)
        for mbps in (float(b) for b in args.bandwidths.split(",")):
            times: dict[str, list[float]] = {name: [] for name in settings}
            ratios, losses = [], {}
            for r in range(args.rounds):
                order = list(settings) if r % 2 == 0 else list(settings)[::-1]
                for name in order:
                    out = folder / f"{name.replace(' ', '-')}-{mbps:g}-{r}"
                    if args.real_link:
                        with two_hosts(rate_mbps=mbps) as hosts:
                            rows = run(shards, corpus, out, args.steps, [*REPLICAS, *settings[name]], hosts)
                    else:
                        link = ["--link-bandwidth-mbps", str(mbps), "--link-latency-ms", "1"]
                        rows = run(shards, corpus, out, args.steps, [*REPLICAS, *settings[name], *link], pin=True)
                    times[name].append(median_step(rows))
                    losses[name] = [row["loss"] for row in rows]
                    sent = rows[-1]["dp_bytes"]  # what went to the other replica (the same either way)
                ratios.append(times["overlapped"][-1] / times["after the step"][-1])
            bytes_s = sent * 8 / (mbps * 1e6)
            best = max(compute_s, compute_s / 3 + bytes_s)
            log.info("%7g %9.3f %10.3f %7.2f %10.3f %8.3f %7.3f %13s", mbps,
                     statistics.median(times["after the step"]), statistics.median(times["overlapped"]),
                     statistics.median(ratios), compute_s, bytes_s, best,
                     losses["overlapped"] == losses["after the step"])  # fmt: skip


if __name__ == "__main__":
    main()
