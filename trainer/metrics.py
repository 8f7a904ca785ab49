"""metrics.jsonl (one JSON object per optimizer step) and the log format of every rank."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from comm.topology import Topology


class MetricsWriter:
    """Appends one line per step, flushed at once, so a crash loses no finished step; with
    ``backend="wandb"`` every row also goes to Weights & Biases (imported only then)."""

    def __init__(self, path: Path, backend: str = "print", project: str = "", run_config: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")
        self._wandb = None
        if backend == "wandb":
            import wandb  # WANDB_MODE, WANDB_NAME, WANDB_DIR, ... are read by wandb itself

            self._wandb = wandb.init(project=project, config=run_config or {})

    def write(self, row: dict) -> None:
        # NaN and inf are not JSON: write null so every reader can parse the file
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """One tqdm bar on the reporting rank (when its stderr is a terminal): loss, lr, tokens/s, ETA."""

    def __init__(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, disable=not sys.stderr.isatty())

    def update(self, row: dict) -> None:
        self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def setup_logging(topo: Topology, level: str) -> None:
    prefix = f"[stage {topo.stage} | replica {topo.replica}]"
    logging.basicConfig(
        level=getattr(logging, level),
        format=f"%(asctime)s %(levelname)s {prefix} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # bitsandbytes (optional, imported by peft when installed) reports missing CPU kernels at import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
