"""DiLoCo between two sites over a slow link, beside the same run on a fast one and synchronous training.

    python bench/diloco_sites.py [--steps 200] [--rate 10] [--plot diloco.png]   (root: network namespaces)

Four ranks as two sites: each site is one pipeline of 2 stages (its two ranks talk over the
site's own loopback), and the two replicas meet over a veth pair between two network
namespaces, which the kernel shapes to --rate Mbit/s (tc tbf). Trains a small GPT-NeoX
(hidden 256, 4 layers) on the bundled data:

- synchronous (--dp-mode allreduce) over an unshaped link: the loss to match;
- DiLoCo (--diloco-flags) over an unshaped link: the step rate to match;
- DiLoCo over the shaped link;
- synchronous over the shaped link, for --slow-sync-steps steps: what DiLoCo saves.

Prints the mean step time of each, DiLoCo's step rate over the slow link as a share of the
fast link's, the loss (mean of the last 10 steps) of each beside synchronous training's, and
the bytes each pipeline sent to the other replica per step (counted where they enter the
collectives); --plot overlays the loss curves with observability.plot.
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
from observability.plot import plot_metrics  # noqa: E402

log = logging.getLogger("bench.diloco_sites")
TOPOLOGY = ["--pipeline-group-size", "2", "--data-group-size", "2", "--seq-length", "128", "--micro-batch-size", "1"]
# streamed in 4 fragments (one per block of the 4), int8 pseudo-gradients, each sync beside one inner step
DILOCO = "--dp-mode diloco --sync-every 16 --diloco-fragments 4 --dp-compress int8 --diloco-overlap-steps 1"
PIPELINE = 2  # ranks per site: rank r is stage r % 2 of replica r // 2 (comm.topology)


def site_of(rank: int) -> str:
    return "ab"[rank // PIPELINE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="steps of each full run")
    parser.add_argument("--rate", type=float, default=10.0, help="the slow link between the sites, Mbit/s")
    parser.add_argument("--diloco-flags", default=DILOCO,
                        help="how DiLoCo runs (one string)")  # fmt: skip
    parser.add_argument("--slow-sync-steps", type=int, default=6, help="steps of synchronous training on the slow link")
    parser.add_argument("--plot", type=Path, default=None, help="write the overlaid loss curves to this PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    diloco = args.diloco_flags.split()
    runs = {  # name: (flags, shaped link, steps)
        "sync, fast link": ([], False, args.steps),
        "diloco, fast link": (diloco, False, args.steps),
        f"diloco, {args.rate:g} Mbit/s": (diloco, True, args.steps),
        f"sync, {args.rate:g} Mbit/s": ([], True, args.slow_sync_steps),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        results, outs = {}, {}
        for name, (flags, shaped, steps) in runs.items():
            outs[name] = folder / name.replace(" ", "").replace(",", "-").replace("/", "")
            with two_hosts(rate_mbps=args.rate if shaped else None) as hosts:
                results[name] = run(shards, corpus, outs[name], steps, [*TOPOLOGY, *flags], hosts, host_of=site_of)
            log.info("%s: done", name)
        base_loss = tail_loss(results["sync, fast link"])
        fast_s = mean_step(results["diloco, fast link"])
        log.info("\n%26s %9s %12s %10s %10s %14s", "run", "step s", "rate share", "loss", "vs sync",
                 "dp bytes/step")  # fmt: skip
        for name, rows in results.items():
            step_s = mean_step(rows)
            share = f"{fast_s / step_s:.1%}" if name.startswith("diloco") else ""
            loss = vs_sync = ""  # a short run's loss is not comparable
            if len(rows) == args.steps:
                loss = f"{tail_loss(rows):.4f}"
                vs_sync = f"{100 * (tail_loss(rows) / base_loss - 1):+.2f}%"
            per_step = sum(r["dp_bytes"] for r in rows) / len(rows)
            log.info("%26s %9.3f %12s %10s %10s %14.0f", name, step_s, share, loss, vs_sync, per_step)
        if args.plot is not None:
            full = [n for n, (_, _, steps) in runs.items() if steps == args.steps]
            plot_metrics([outs[n] / "metrics.jsonl" for n in full], args.plot, full)
            log.info("wrote %s", args.plot)


def mean_step(rows: list[dict]) -> float:
    """Time per step after the first (the mean, not the median: a sync that blocks shows in
    the steps it lands at only, and those count)."""
    return statistics.fmean(r["step_time_s"] for r in rows[1:])


def tail_loss(rows: list[dict]) -> float:
    """The mean loss of the last 10 steps (one step's batch is too small to compare alone)."""
    tail = rows[-10:]
    return sum(r["loss"] for r in tail) / len(tail)


if __name__ == "__main__":
    main()
