"""``--profiling tidy_profiling``: per-rank Chrome traces, one merged trace, a summary and a picture.

    <checkpoint-path>/trace/rank<N>.json   this rank's spans (its own clock) + its clock offset
    <checkpoint-path>/trace/merged.json    every rank on rank 0's clock: open in Perfetto or chrome://tracing
    <checkpoint-path>/trace/summary.json   per rank: compute, communication and idle seconds, bubble
    <checkpoint-path>/trace/timeline.png   the merged trace drawn as lanes per rank

The bubble of a rank is the share of its pipeline schedule (all micro-batch forwards and
backwards of a step) not spent computing; GPipe's theory is (p-1)/(m+p-1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from comm.process_group import Communicator
from comm.topology import Topology
from comm.trace import LANES, Tracer

log = logging.getLogger(__name__)
COMPUTE = ("forward compute", "backward compute", "optimizer step")
COMMUNICATION = ("forward recv", "forward send", "backward recv", "backward send", "data-parallel comm")


def trace_dir(checkpoint_path: Path) -> Path:
    return checkpoint_path / "trace"


def write_rank_trace(checkpoint_path: Path, tracer: Tracer, topo: Topology, offset_us: float) -> Path:
    """This rank's events with names for the process and its lanes."""
    folder = trace_dir(checkpoint_path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = [{"name": "process_name", "ph": "M", "pid": topo.rank, "args": {"name": topo.describe(topo.rank)}}]
    meta += [{"name": "thread_name", "ph": "M", "pid": topo.rank, "tid": i, "args": {"name": lane}}
             for i, lane in enumerate(LANES)]  # fmt: skip
    path = folder / f"rank{topo.rank}.json"
    path.write_text(json.dumps({"traceEvents": meta + tracer.events, "clock_offset_us": offset_us}))
    return path


def _sum(events: list[dict], lanes: tuple[str, ...]) -> float:
    ids = {LANES.index(lane) for lane in lanes}
    return sum(e["dur"] for e in events if e.get("ph") == "X" and e["tid"] in ids) / 1e6


def summarize(events: list[dict], topo: Topology, rank: int) -> dict:
    wall = _sum(events, ("step",))
    compute = _sum(events, COMPUTE)
    comm = _sum(events, COMMUNICATION)
    schedule = _sum(events, ("pipeline",))
    pipeline_compute = _sum(events, ("forward compute", "backward compute"))
    return {
        "rank": rank,
        "stage": rank % topo.pipeline_size,
        "replica": rank // topo.pipeline_size,
        "steps": sum(1 for e in events if e.get("ph") == "X" and e["tid"] == LANES.index("step")),
        "wall_s": wall,
        "compute_s": compute,
        "communication_s": comm,
        "idle_s": max(0.0, wall - compute - comm),
        "bubble_fraction": 1 - pipeline_compute / schedule if schedule > 0 else 0.0,
    }


def merge(checkpoint_path: Path, topo: Topology, micro_batches: int) -> dict:
    """Rank 0, after every rank wrote its file: merged trace, summary and timeline picture."""
    folder = trace_dir(checkpoint_path)
    merged, ranks = [], []
    for rank in range(topo.world_size):
        data = json.loads((folder / f"rank{rank}.json").read_text())
        events = data["traceEvents"]
        ranks.append(summarize(events, topo, rank))
        shift = data["clock_offset_us"]
        merged += [{**e, "ts": e["ts"] + shift} if e.get("ph") == "X" else e for e in events]
    start = min((e["ts"] for e in merged if e.get("ph") == "X"), default=0.0)
    merged = [{**e, "ts": e["ts"] - start} if e.get("ph") == "X" else e for e in merged]
    (folder / "merged.json").write_text(json.dumps({"traceEvents": merged, "displayTimeUnit": "ms"}))
    p = topo.pipeline_size
    summary = {
        "ranks": ranks,
        "bubble_fraction": sum(r["bubble_fraction"] for r in ranks) / len(ranks),
        "bubble_theory_gpipe": (p - 1) / (micro_batches + p - 1),
        "micro_batches": micro_batches,
        "pipeline_stages": p,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    draw_timeline(merged, topo, folder / "timeline.png")
    log.info("profile: bubble %.2f (GPipe theory %.2f); traces in %s", summary["bubble_fraction"],
             summary["bubble_theory_gpipe"], folder)  # fmt: skip
    return summary


def draw_timeline(events: list[dict], topo: Topology, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [lane for lane in LANES if lane not in ("step", "pipeline")]
    colors = dict(zip(shown, plt.get_cmap("tab10").colors, strict=False))
    fig, ax = plt.subplots(figsize=(12, 1 + 0.5 * topo.world_size * 2))
    rows = []
    for rank in range(topo.world_size):
        for kind, lanes in (("compute", COMPUTE), ("comm", COMMUNICATION)):
            y = len(rows)
            rows.append(f"rank {rank} {kind}")
            for lane in lanes:
                spans = [(e["ts"] / 1e3, e["dur"] / 1e3) for e in events
                         if e.get("ph") == "X" and e["pid"] == rank and e["tid"] == LANES.index(lane)]  # fmt: skip
                if spans:
                    ax.broken_barh(spans, (y - 0.4, 0.8), color=colors[lane], label=lane)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize="small", ncols=4)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("ms (rank 0's clock)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Profiler:
    """What ``--profiling`` asks for, driven by the training loop: ``stepped()`` after each
    step, ``finish()`` once at the end (every rank: it synchronises)."""

    def __init__(self, mode: str, folder: Path, micro_batches: int, comm: Communicator) -> None:
        """``mode``: --profiling (``tidy_profiling``, ``pytorch_profiling`` or none); ``folder``:
        the checkpoint folder the traces go under; ``micro_batches``: a step's, for the summary."""
        self.folder, self.micro_batches, self.comm = folder, micro_batches, comm
        self.offset_us = 0.0
        self.torch_profiler = None
        if mode == "tidy_profiling":
            comm.tracer = Tracer(comm.topo.rank, comm.device)
            self.offset_us = comm.clock_offset_us(comm.tracer.now_us)
        elif mode == "pytorch_profiling":
            import torch

            traces = trace_dir(folder)
            traces.mkdir(parents=True, exist_ok=True)
            path = traces / f"torch_rank{comm.topo.rank}.json"
            self.torch_profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
                on_trace_ready=lambda prof: prof.export_chrome_trace(str(path)),
            )
            self.torch_profiler.start()

    def stepped(self) -> None:
        if self.torch_profiler is not None:
            self.torch_profiler.step()

    def finish(self) -> None:
        if self.torch_profiler is not None:
            self.torch_profiler.stop()
        if not isinstance(self.comm.tracer, Tracer):
            return
        topo = self.comm.topo
        write_rank_trace(self.folder, self.comm.tracer, topo, self.offset_us)
        self.comm.barrier_all()  # every rank's file is written
        if topo.rank == 0:
            merge(self.folder, topo, self.micro_batches)
