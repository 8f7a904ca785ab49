"""A rank that dies (SIGKILL, from itself) at the N-th call of one function, for tests of a loss
at a moment no outside signal can hit reliably on a model this small:

    python tests/dies_in.py MODULE:FUNCTION N <dist_clm_train.py's flags>

e.g. ``trainer.loop:save_checkpoint 2`` (the second checkpoint's commit begins) or
``data_parallel.sharded:Sharded.after_update 10`` (step 10's gather of the updated shards).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dist_clm_train


def main() -> None:
    target, calls, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    module_name, _, path = target.partition(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module_name)
    for attribute in owners:
        owner = getattr(owner, attribute)
    original, seen = getattr(owner, name), [0]

    def or_die(*args: object, **kwargs: object) -> object:
        seen[0] += 1
        if seen[0] == calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, or_die)
    dist_clm_train.main(argv)


if __name__ == "__main__":
    main()
