"""A spare taking a killed or preempted rank's place (--spares): how long the run stops, beside the link.

    python bench/spares.py [--mbps 20] [--steps 12]

Trains a small GPT-NeoX (hidden 256, 4 layers) on this machine with every send held to --mbps by
the link emulation, three times:

- pp=2 x dp=2 and one spare: rank 3 (replica 1's last stage) is SIGKILLed after step 3; the spare
  takes its place with the state of replica 0's stage 1, sent over the emulated link.
- pp=2 x dp=1 and one spare, a checkpoint every 4 steps: rank 1 is SIGKILLed after step 6; no
  live copy of its stage exists, so rank 0 and the spare roll back to checkpoint 4 in-process.
- pp=2 x dp=2 and one spare: rank 3 gets SIGTERM (a preemption notice) after step 3; at the end of
  its step every rank commits that step, rank 3 leaves and the spare takes its place as above.

For each: the seconds from the signal to the next step's row after the takeover (the step in
flight done again, the first step after the roll-back, or the step after the notice's), what the
run's own event rows say it took, a step's time before the signal, and the time the largest
stage's state (weights and AdamW files, by the final checkpoint's manifests) needs at --mbps.
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

log = logging.getLogger("bench.spares")


def losing_a_rank(shards: Path, corpus: Path, out: Path, args: argparse.Namespace, dp: int, victim: int,
                  after: int, how: signal.Signals = signal.SIGKILL) -> tuple[float, dict]:  # fmt: skip
    """Run pp=2 x ``dp`` with one spare, send ``victim`` ``how`` after step ``after``; the seconds
    from the signal to the next training row written after it, and the run's event rows by kind."""
    port, ranks = free_port(), 2 * dp + 1
    flags = ["--model-name", str(shards), "--task-name", str(corpus), "--seq-length", "128",
             "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--total-steps", str(args.steps),
             "--checkpoint-path", str(out), "--checkpoint-steps", "4", "--log-level", "WARNING",
             "--pipeline-group-size", "2", "--data-group-size", str(dp), "--spares", "1",
             "--link-bandwidth-mbps", str(args.mbps), "--dist-url", f"tcp://127.0.0.1:{port}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "dist_clm_train.py"), "--rank", str(rank), *flags],
                              cwd=ROOT, env=env, stderr=subprocess.DEVNULL) for rank in range(ranks)]  # fmt: skip
    wait_for_step(out, after, procs)
    procs[victim].send_signal(how)
    killed, rows_then = time.time(), len(metric_rows(out))
    steps = sorted(r["step_time_s"] for r in metric_rows(out)[1:rows_then] if "loss" in r)  # not the first
    while not _stepped_after_event(metric_rows(out)[rows_then:]):
        if all(p.poll() is not None for p in procs):
            raise RuntimeError("every rank stopped")
        time.sleep(0.02)
    back = time.time() - killed
    if any(p.wait() for i, p in enumerate(procs) if i != victim):
        raise RuntimeError("a rank failed after the spare took over")
    log.info("dp=%d: a step took %.2f s before the signal (median)", dp, steps[len(steps) // 2])
    return back, {r["event"]: r for r in metric_rows(out) if "event" in r}


def _stepped_after_event(rows: list[dict]) -> bool:
    """Whether a training row follows an event row (the spare's takeover; a notice's step, in
    flight at the signal, comes before it)."""
    events = [i for i, r in enumerate(rows) if "event" in r]
    return bool(events) and any("loss" in r for r in rows[events[0] + 1 :])


def main() -> None:
    args = emulated_link_args(__doc__, 12)
    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards = build_model(folder, corpus)
        handed, events = losing_a_rank(shards, corpus, folder / "handed", args, dp=2, victim=3, after=3)
        took = events["spare took over"]
        state = largest_stage_bytes(folder / "handed" / f"checkpoint_{args.steps}")
        wire = state * 8 / (args.mbps * 1e6)
        log.info("dp=2: the step in flight (%d) was done again %.2f s after the kill; the survivors' regroup and "
                 "the hand-over took %.2f s of it; the largest stage's state, %.1f MB, takes %.2f s at %g Mbit/s",
                 took["step"], handed, took["takeover_s"], state / 1e6, wire, args.mbps)  # fmt: skip
        rolled, events = losing_a_rank(shards, corpus, folder / "rolled", args, dp=1, victim=1, after=6)
        back = events["rolled back"]
        log.info("dp=1: rolled back from step %d to checkpoint %d; the first step after it was done %.2f s after "
                 "the kill (the agreement, new groups and reloading the checkpoint: %.2f s)", back["from_step"],
                 back["step"], rolled, back["rollback_s"])  # fmt: skip
        noticed, events = losing_a_rank(shards, corpus, folder / "noticed", args, dp=2, victim=3, after=3,
                                        how=signal.SIGTERM)  # fmt: skip
        took, preempted = events["spare took over"], events["preempted"]
        log.info("dp=2, a notice: the first step after step %d, with the spare, was done %.2f s after the signal "
                 "(the commit of step %d: %.2f s; the regroup and the hand-over: %.2f s)", took["step"], noticed,
                 preempted["step"], preempted["commit_s"], took["takeover_s"])  # fmt: skip


if __name__ == "__main__":
    main()
