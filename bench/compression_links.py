"""Step time and loss per compression setting over emulated slow links, side by side.

    python bench/compression_links.py [--bandwidths 1000,100,10] [--steps 20]

Trains a small GPT-NeoX (hidden 256) with 2 pipeline stages on this machine, once per
(link bandwidth, compression) pair, holding every send to the bandwidth with
--link-bandwidth-mbps (and 5 ms latency), or with --real-link over two network namespaces
whose veth pair the kernel shapes to the bandwidth (tc tbf; needs root). Prints the median
step time, its ratio to fp32 at the same bandwidth, the final loss, and beside them the two
limits: the step time of compute alone (no emulated link) and the time the bytes alone need
at that bandwidth.
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
from bench.netns import NetHosts, two_hosts  # noqa: E402

log = logging.getLogger("bench.compression_links")
# --pp-compress alone: its gradients follow by default (fp16 -> fp16, int8 and int4 -> int8)
SETTINGS = {
    "fp32": [],
    "fp16": ["--pp-compress", "fp16"],
    "int8": ["--pp-compress", "int8"],
    "int4": ["--pp-compress", "int4"],
    "int4 per-token scales": ["--pp-compress", "int4", "--pp-compress-group", "0", "--pp-compress-outliers", "0"],
}


def main() -> None:
    # 20 steps: the median of 19; of 7 it moved 5-10% between runs, as much as int4's margins here
    args = link_parser(__doc__, "1000,100,10", 20, "between the stages").parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        compute = run(shards, corpus, folder / "compute", args.steps, ["--pipeline-group-size", "2"])
        compute_s = statistics.median(r["step_time_s"] for r in compute[1:])
        log.info("compute alone (no emulated link): %.3f s/step\n", compute_s)
        log.info("%8s %22s %10s %9s %9s %10s %10s", "Mbit/s", "codec", "step s", "vs fp32", "loss", "bytes s",
                 "bytes/step")  # fmt: skip
        for mbps in (float(b) for b in args.bandwidths.split(",")):
            if args.real_link:  # two namespaces, the kernel shaping the veth to the rate
                with two_hosts(rate_mbps=mbps) as hosts:
                    measure_rates(shards, corpus, folder, args.steps, mbps, [], hosts)
            else:
                link = ["--link-bandwidth-mbps", str(mbps), "--link-latency-ms", "5"]
                measure_rates(shards, corpus, folder, args.steps, mbps, link, None)


def measure_rates(
    shards: Path, corpus: Path, folder: Path, steps: int, mbps: float, link: list[str], hosts: NetHosts | None
) -> None:
    base = None
    for name, flags in SETTINGS.items():
        out = folder / f"{name.replace(' ', '-')}-{mbps:g}"
        rows = run(shards, corpus, out, steps, ["--pipeline-group-size", "2", *flags, *link], hosts)
        step_s = statistics.median(r["step_time_s"] for r in rows[1:])
        base = base or step_s
        wire_s = rows[-1]["comm_bytes"] * 8 / (mbps * 1e6)
        log.info("%8g %22s %10.3f %8.2fx %9.4f %10.3f %10d", mbps, name, step_s, base / step_s,
                 rows[-1]["loss"], wire_s, rows[-1]["comm_bytes"])  # fmt: skip


if __name__ == "__main__":
    main()
