"""A rank that dies (SIGKILL, from itself) as the commit of checkpoint ``STEP`` begins, for tests
of a loss during a commit, which no outside signal can hit reliably on a model this small:

    python tests/dies_in_commit.py STEP <dist_clm_train.py's flags>
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dist_clm_train
import trainer.loop


def main() -> None:
    step, argv = int(sys.argv[1]), sys.argv[2:]
    save = trainer.loop.save_checkpoint

    def save_or_die(root: Path, at: int, *args: object, **kwargs: object) -> None:
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        save(root, at, *args, **kwargs)

    trainer.loop.save_checkpoint = save_or_die
    dist_clm_train.main(argv)


if __name__ == "__main__":
    main()
