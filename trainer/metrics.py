"""metrics.jsonl (one JSON object per optimizer step) and the log format of every rank."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from comm.topology import Topology


class MetricsWriter:
    """Appends one line per step, flushed at once, so a crash loses no finished step."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")

    def write(self, row: dict) -> None:
        # NaN and inf are not JSON: write null so every reader can parse the file
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()


def setup_logging(topo: Topology, level: str) -> None:
    prefix = f"[stage {topo.stage} | replica {topo.replica}]"
    logging.basicConfig(
        level=getattr(logging, level),
        format=f"%(asctime)s %(levelname)s {prefix} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
