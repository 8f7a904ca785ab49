"""The rendezvous store of an elastic run, in a process of its own.

    python -m comm.store_host --port 7033 [--idle-exit 60]

Without ``--elastic`` the store lives inside rank 0, so losing rank 0 loses the job. An elastic
run must outlive any of its ranks, so its store does too: rank 0 starts this process detached
(``rendezvous.elastic_store``) when none answers at ``--dist-url``, or an operator starts it on a
machine that stays up. It leaves when a finished run says so, when no rank has beaten for
``--idle-exit`` seconds once the run trains (every rank of the job is gone), or when the rank
that started it is gone before the run trains (a launch that failed).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch.distributed as dist

CURRENT = "elastic/current"  # the generation that trains, as JSON (comm.membership.publish)
FINISHED = "elastic/finished"  # set by the last generation's rank 0 after a clean end
PULSE = "elastic/pulse"  # every heartbeat adds one


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(port: int, idle_exit_s: float, parent: int | None, poll_s: float = 1.0) -> None:
    """Host the store until the run finishes, or (once it trains) no heartbeat has come for
    ``idle_exit_s``, or (before it trains) the rank that started this process is gone."""
    store = dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    last, moved = -1, time.monotonic()
    while True:
        time.sleep(poll_s)
        if store.check([FINISHED]):
            time.sleep(2 * poll_s)  # ranks still closing may read a last key
            return
        if not store.check([CURRENT]):  # starting: the job lives as long as its rank 0 does
            if parent is not None and not _alive(parent):
                return
            moved = time.monotonic()
            continue
        pulse = store.add(PULSE, 0)
        if pulse != last:
            last, moved = pulse, time.monotonic()
        elif time.monotonic() - moved > idle_exit_s:
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-exit", type=float, default=60.0, help="seconds without a heartbeat before leaving")
    parser.add_argument("--parent", type=int, default=None, help="pid of the rank that started this host")
    args = parser.parse_args(argv)
    serve(args.port, args.idle_exit, args.parent)


if __name__ == "__main__":
    main()
