"""metrics.jsonl (one JSON object per optimizer step) and the log format of every rank."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from comm.topology import Topology


class NamedTotals:
    """Named values the replicas add up in one message, read back by name: a step's loss, the
    routers' aux, DPO's metrics and a preemption slot per replica; an evaluation's sums. Laid end
    to end in the order added, in the first value's dtype and device."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.slots: dict[str, slice] = {}
        self.size = 0

    def add(self, name: str, values: torch.Tensor) -> None:
        values = values.reshape(-1) if not self.parts else values.to(self.parts[0]).reshape(-1)
        self.parts.append(values)
        self.slots[name] = slice(self.size, self.size + values.numel())
        self.size += values.numel()

    def flat(self) -> torch.Tensor:
        return torch.cat(self.parts)

    def read(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each name's values in ``flat`` (``flat()``, or the replicas' sum of it)."""
        return {name: flat[where] for name, where in self.slots.items()}


class PipelineSums:
    """Named statistics that the stages of a pipeline add up in one all-reduce: a name holds one
    value, or with ``per_stage`` one slot per stage that only this stage fills (so the sum
    gathers every stage's value). ``reduce`` gives each name's list of summed values."""

    def __init__(self, stage: int, stages: int) -> None:
        self.stage, self.stages = stage, stages
        self.totals = NamedTotals()

    def add(self, name: str, value: float, per_stage: bool = False) -> None:
        values = [float(value) if s == self.stage else 0.0 for s in range(self.stages)] if per_stage else [float(value)]
        # float64: byte counts and squared norms stay exact
        self.totals.add(name, torch.tensor(values, dtype=torch.float64))

    def reduce(self, all_reduce: Callable[[torch.Tensor], None], device: torch.device) -> dict[str, list[float]]:
        summed = self.totals.flat().to(device)
        all_reduce(summed)
        return {name: values.tolist() for name, values in self.totals.read(summed).items()}


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


class _AboveTheBar:
    """A log handler's stream while a progress bar is drawn on it: each line is written through
    tqdm, which clears the bar, writes the line and draws the bar again below it (written
    directly, a line would land in the middle of the bar: ``tok_s=23815]0 12:56:52 INFO``)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """One tqdm bar on the reporting rank (when its stderr is a terminal): loss, lr, tokens/s, ETA.
    While it is drawn, this process's log lines to that terminal go above it."""

    def __init__(self, total: int, done: int) -> None:
        from tqdm import tqdm

        shown = sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, disable=not shown)
        self._moved: list[tuple[logging.StreamHandler, TextIO]] = []  # handler, its own stream
        for handler in logging.getLogger().handlers if shown else []:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                self._moved.append((handler, handler.setStream(_AboveTheBar(sys.stderr))))

    def update(self, row: dict) -> None:
        shown = {"loss": f"{row['loss']:.4f}"}
        accuracy = row.get("rewards/accuracies", row.get("accuracy"))
        if accuracy is not None:  # preference tuning: how often the chosen response wins
            shown["acc"] = f"{accuracy:.2f}"
        self._bar.set_postfix(**shown, lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        self._bar.update(1)

    def close(self) -> None:
        for handler, stream in self._moved:
            handler.setStream(stream)
        self._moved.clear()
        self._bar.close()


# ``extra=`` of a log line every rank would write alike: rank 0 alone writes it (ONCE), or the
# first replica of each stage (PER_STAGE), so a start-up says each thing once
ONCE, PER_STAGE = {"once": "run"}, {"once": "stage"}


class _SaidOnce(logging.Filter):
    """Drops the lines marked ONCE on every rank but 0, and those marked PER_STAGE on every
    replica but the first."""

    def __init__(self, topo: Topology | None) -> None:
        super().__init__()
        self.topo = topo

    def filter(self, record: logging.LogRecord) -> bool:
        once = getattr(record, "once", None)
        if once is not None and self.topo is None:  # a waiting spare says nothing for the run
            return False
        return once is None or (self.topo.rank == 0 if once == "run" else self.topo.replica == 0)


def setup_logging(topo: Topology, level: str, spare: int | None = None) -> None:
    """Every line prefixed with this rank's place (a waiting --spares process: its rank)."""
    prefix = f"[stage {topo.stage} | replica {topo.replica}]" if spare is None else f"[spare rank {spare}]"
    logging.basicConfig(
        level=getattr(logging, level),
        format=f"%(asctime)s %(levelname)s {prefix} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for handler in logging.getLogger().handlers:  # handlers see every logger's records
        handler.addFilter(_SaidOnce(topo if spare is None else None))
    # bitsandbytes (optional, imported by peft when installed) reports missing CPU kernels at import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
