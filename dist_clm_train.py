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
# Each rank already owns its share of the cores; tokenizer threads would only compete.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from data.config import DataConfig
from data.preview import preview
from observability.metrics import setup_logging
from run.entry import run
from run.sample import sample
from trainer.checkpoint import CheckpointError
from trainer.cli import config_from_args, parse_args
from trainer.startup import StartupError


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.preview_data > 0:  # no process group: a look at the data mix, then exit
            tokenizer = args.tokenizer_name or args.model_name
            preview(DataConfig.from_args(args), tokenizer, args.preview_data, sys.stdout, args.preview_format,
                    pairs=args.objective in ("dpo", "reward"))  # fmt: skip
            return
        cfg = config_from_args(args)
    except (ValueError, OSError) as err:
        sys.exit(f"dist_clm_train.py: error: {err}")
    setup_logging(cfg.topology, cfg.log_level, cfg.spare_rank)
    try:
        sample(cfg) if cfg.generation.sampling_only else run(cfg)
    except (StartupError, CheckpointError, ConnectionError, ValueError, OSError, ArithmeticError) as err:
        logging.getLogger("dist_clm_train").error("%s", err)
        for handler in logging.getLogger().handlers:
            handler.flush()
        # Leave now: interpreter shutdown would tear down process groups, which can wait on a
        # dead or frozen peer. Checkpoints and metrics are already on disk (written atomically).
        os._exit(1)


if __name__ == "__main__":
    main()
