"""An elastic run losing a replica and taking it back: recovery and join times beside the link.

    python bench/elastic_join.py [--mbps 20] [--steps 16]

Trains a small GPT-NeoX (hidden 256, 4 layers) with pp=2 x dp=2 and --elastic on this machine,
every send held to --mbps by the link emulation. Rank 3 (replica 1's last stage) is SIGKILLed
after step 3, and replica 1 (ranks 2 and 3) is started again with the same command once step 6
is done. Prints how long after the kill the survivors had regrouped, the live ranks' pause for
the join (``join_s`` of the metrics' event row), the time the largest stage's state (its weights
and AdamW files, by the final checkpoint's manifests) takes at --mbps, and the ratio of the two.
"""

from __future__ import annotations

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

log = logging.getLogger("bench.elastic_join")


def main() -> None:
    args = emulated_link_args(__doc__, 16)
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards, out = build_model(folder, corpus), folder / "ckpt"
        port = free_port()
        flags = ["--model-name", str(shards), "--task-name", str(corpus), "--seq-length", "128",
                 "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--total-steps", str(args.steps),
                 "--checkpoint-path", str(out), "--checkpoint-steps", "1000", "--log-level", "WARNING",
                 "--pipeline-group-size", "2", "--data-group-size", "2", "--elastic",
                 "--link-bandwidth-mbps", str(args.mbps), "--dist-url", f"tcp://127.0.0.1:{port}"]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

        def start(rank: int) -> subprocess.Popen:
            argv = [sys.executable, str(ROOT / "dist_clm_train.py"), "--rank", str(rank), *flags]
            return subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)

        procs = [start(rank) for rank in range(4)]
        wait_for_step(out, 3, procs)
        procs[3].send_signal(signal.SIGKILL)
        killed = time.time()
        wait_for_step(out, 6, procs[:2])
        procs[2:] = [start(2), start(3)]
        if any(p.wait() for p in (procs[0], procs[1], procs[2], procs[3])):
            raise RuntimeError("a rank failed after the join")
        events = {r["event"]: r for r in metric_rows(out) if "event" in r}
        left, joined = events["replicas left"], events["replicas joined"]
        state = largest_stage_bytes(out / f"checkpoint_{args.steps}")
        wire = state * 8 / (args.mbps * 1e6)
        log.info("regrouped %.2f s after the kill (at step %d; their own regroup took %.2f s)",
                 left["unix_time"] - killed, left["step"], left["regroup_s"])  # fmt: skip
        log.info("join at step %d: live ranks paused %.2f s; the largest stage's state, %.1f MB, takes %.2f s "
                 "at %g Mbit/s: ratio %.2f", joined["step"], joined["join_s"], state / 1e6, wire, args.mbps,
                 joined["join_s"] / wire)  # fmt: skip


if __name__ == "__main__":
    main()
