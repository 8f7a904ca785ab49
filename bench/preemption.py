"""A preemption notice: how long from SIGTERM to every rank's exit, beside the link.

    python bench/preemption.py [--mbps 20] [--steps 40]

Trains a small GPT-NeoX (hidden 256, 4 layers) with pp=2 x dp=2 on this machine, every send held
to --mbps by the link emulation, and sends SIGTERM to rank 3 (replica 1's last stage) after step 3,
twice: without --elastic (every rank commits that step's checkpoint and exits 0) and with it
(replica 1 leaves, replica 0 trains on to --steps). Prints the seconds from the signal to the last
exit and the checkpoint commit, or the leaving ranks' exit and the survivors' regroup, beside the
time the largest stage's state (weights and AdamW files, by the checkpoint's manifests) takes at
--mbps: what a notice would have to cover if that state had to cross the link instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    build_model,
    emulated_link_args,
    free_port,
    largest_stage_bytes,
    metric_rows,
    wait_for_step,
)

log = logging.getLogger("bench.preemption")


def run(shards: Path, corpus: Path, out: Path, args: argparse.Namespace, elastic: bool) -> tuple[list[float], dict]:
    """Start 4 ranks, SIGTERM rank 3 after step 3; the seconds from the signal to each rank's exit
    and the run's metrics rows by event."""
    flags = ["--model-name", str(shards), "--task-name", str(corpus), "--seq-length", "128",
             "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--total-steps", str(args.steps),
             "--checkpoint-path", str(out), "--checkpoint-steps", "1000", "--log-level", "WARNING",
             "--pipeline-group-size", "2", "--data-group-size", "2", *(["--elastic"] if elastic else []),
             "--link-bandwidth-mbps", str(args.mbps), "--dist-url", f"tcp://127.0.0.1:{free_port()}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    argv = [sys.executable, str(ROOT / "dist_clm_train.py"), *flags]
    procs = [subprocess.Popen([*argv, "--rank", str(rank)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
             for rank in range(4)]  # fmt: skip
    wait_for_step(out, 3, procs)
    procs[3].send_signal(signal.SIGTERM)
    noticed, exits = time.monotonic(), [0.0] * 4
    while any(p.poll() is None for p in procs):
        for rank, p in enumerate(procs):
            if p.poll() is not None and not exits[rank]:
                exits[rank] = time.monotonic() - noticed
        time.sleep(0.01)
    for rank, p in enumerate(procs):
        exits[rank] = exits[rank] or time.monotonic() - noticed
        if p.returncode != 0:
            raise RuntimeError(f"rank {rank} exited {p.returncode}")
    return exits, {r["event"]: r for r in metric_rows(out) if "event" in r}


def main() -> None:
    args = emulated_link_args(__doc__, 40)
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        exits, events = run(shards, corpus, folder / "stop", args, elastic=False)
        stopped = events["preempted"]
        state = largest_stage_bytes(folder / "stop" / f"checkpoint_{stopped['step']}")
        wire = state * 8 / (args.mbps * 1e6)
        log.info("without --elastic: every rank exited %.2f s after SIGTERM (checkpoint of step %d committed in "
                 "%.2f s); the largest stage's state, %.1f MB, takes %.2f s at %g Mbit/s",
                 max(exits), stopped["step"], stopped["commit_s"], state / 1e6, wire, args.mbps)  # fmt: skip
        exits, events = run(shards, corpus, folder / "elastic", args, elastic=True)
        left = events["replicas left"]
        log.info("with --elastic: replica 1 exited %.2f s after SIGTERM (after step %d); replica 0 regrouped "
                 "in %.2f s and finished %d steps", max(exits[2:]), left["step"], left["regroup_s"],
                 args.steps)  # fmt: skip


if __name__ == "__main__":
    main()
