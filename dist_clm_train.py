"""Fine-tune a causal LM with pipeline and data parallelism: run one process per GPU.

    python dist_clm_train.py --rank N --model-name <sharded dir> --task-name data.jsonl \
        --pipeline-group-size 2 --data-group-size 2 --dist-url tcp://<rank-0 ip>:7033 ...

See README.md for the workflow and ``--help`` for every flag.
"""

from __future__ import annotations

import logging
import os
import sys

# c10d logs a C++ stack trace for every failed connection attempt before Python sees the
# error; our own messages say what failed and how to fix it. Set the variable to see them.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

from trainer.cli import build_parser, config_from_args
from trainer.loop import StartupError, run
from trainer.metrics import setup_logging


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as err:
        sys.exit(f"dist_clm_train.py: error: {err}")
    setup_logging(cfg.topology, cfg.log_level)
    try:
        run(cfg)
    except (StartupError, ConnectionError, ValueError, OSError) as err:
        logging.getLogger("dist_clm_train").error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
