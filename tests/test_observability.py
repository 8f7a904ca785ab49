"""Profiling traces, quiet non-reporting ranks, metrics plots, wandb offline, flags and launchers."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comm.trace import LANES
from observability.metrics import Progress
from observability.plot import plot_metrics
from tests.helpers import OFFLINE_ENV, ROOT, assert_all_ok, free_port, launch, read_metrics
from trainer.cli import build_parser, parse_args

STEPS, MICRO = 6, 4
PNG = b"\x89PNG\r\n\x1a\n"


def args_for(shards: Path, tasks: str, ckpt: Path, pp: int = 2, steps: int = STEPS, seq: int = 512) -> list[str]:
    return [
        "--model-name", str(shards), "--task-name", tasks, "--seq-length", str(seq),
        "--pipeline-group-size", str(pp), "--batch-size", str(2 * MICRO), "--micro-batch-size", "2",
        "--lr", "1e-3", "--total-steps", str(steps), "--checkpoint-path", str(ckpt), "--checkpoint-steps", "100",
        "--log-interval", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def profiled(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    tmp = tmp_path_factory.mktemp("profiled")
    results = launch([*args_for(tiny_shards, two_tasks, tmp / "ckpt"), "--profiling", "tidy_profiling"], 2, tmp)
    assert_all_ok(results)
    return tmp / "ckpt", results


def spans(events: list[dict], lane: str, pid: int | None = None) -> list[dict]:
    """Spans of one lane, without the waits for sends still in flight at the end of a step."""
    return [e for e in events if e.get("ph") == "X" and e["tid"] == LANES.index(lane) and pid in (None, e["pid"])
            and e["name"] != "flush"]  # fmt: skip


@pytest.mark.ranks
def test_rank_traces_are_complete(profiled: tuple[Path, list]) -> None:
    ckpt, _ = profiled
    for rank in (0, 1):
        data = json.loads((ckpt / "trace" / f"rank{rank}.json").read_text())
        events = data["traceEvents"]
        assert all(e["pid"] == rank for e in events)
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events if e["ph"] == "X")
        assert len(spans(events, "step")) == STEPS
        assert len(spans(events, "forward compute")) == len(spans(events, "backward compute")) == STEPS * MICRO
        assert len(spans(events, "optimizer step")) == STEPS
        # stage 0 receives no activations; stage 1 sends none
        sent, received = ("forward send", "backward recv") if rank == 0 else ("backward send", "forward recv")
        assert len(spans(events, sent)) == len(spans(events, received)) == STEPS * MICRO
        assert not spans(events, "forward recv" if rank == 0 else "forward send")
        names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
        assert names == set(LANES)


@pytest.mark.ranks
def test_merged_trace_puts_ranks_on_one_clock(profiled: tuple[Path, list]) -> None:
    ckpt, _ = profiled
    events = json.loads((ckpt / "trace" / "merged.json").read_text())["traceEvents"]
    first, second = spans(events, "forward compute", 0), spans(events, "forward compute", 1)
    assert len(first) == len(second) == STEPS * MICRO
    # stage 1 can only start micro-batch i after stage 0 has finished it (1 ms of clock error allowed)
    for a, b in zip(first, second, strict=True):
        assert b["ts"] >= a["ts"] + a["dur"] - 1000, (a, b)
    assert (ckpt / "trace" / "timeline.png").read_bytes().startswith(PNG)


@pytest.mark.ranks
def test_summary_bubble_is_close_to_gpipe_theory(profiled: tuple[Path, list]) -> None:
    ckpt, _ = profiled
    summary = json.loads((ckpt / "trace" / "summary.json").read_text())
    assert summary["bubble_theory_gpipe"] == pytest.approx(1 / (MICRO + 1))
    assert summary["bubble_fraction"] == pytest.approx(summary["bubble_theory_gpipe"], abs=0.12)
    for rank in summary["ranks"]:
        assert rank["steps"] == STEPS
        assert rank["compute_s"] > 0 and rank["communication_s"] > 0
        assert rank["compute_s"] + rank["communication_s"] + rank["idle_s"] >= rank["wall_s"] * 0.999


@pytest.mark.ranks
def test_only_the_reporting_rank_logs_steps(profiled: tuple[Path, list]) -> None:
    _, results = profiled
    assert f"step {STEPS}/{STEPS} loss" in results[1].output  # the last stage of replica 0 reports
    assert " loss " not in results[0].output and "it/s" not in results[0].output
    assert "it/s" not in results[1].output  # no progress bar when stderr is not a terminal


@pytest.mark.ranks
def test_plot_of_metrics(profiled: tuple[Path, list], tmp_path: Path) -> None:
    ckpt, _ = profiled
    assert plot_metrics(ckpt / "metrics.jsonl", tmp_path / "m.png").read_bytes().startswith(PNG)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training rows"):
        plot_metrics(tmp_path / "empty.jsonl", tmp_path / "e.png")
    # several runs overlaid, one label each (their legend makes a different picture)
    both = plot_metrics([ckpt / "metrics.jsonl"] * 2, tmp_path / "both.png", ["sync", "diloco"])
    assert both.read_bytes().startswith(PNG) and both.read_bytes() != (tmp_path / "m.png").read_bytes()
    with pytest.raises(ValueError, match="1 labels for 2 metrics files"):
        plot_metrics([ckpt / "metrics.jsonl"] * 2, tmp_path / "x.png", ["one"])


@pytest.mark.ranks
def test_pytorch_profiler_and_wandb_offline(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    profiling = ["--profiling", "pytorch_profiling", "--train-log-backend", "wandb", "--project-name", "unit"]
    args = [*args_for(tiny_shards, two_tasks, tmp_path / "ckpt", pp=1, seq=64), *profiling]
    assert_all_ok(launch(args, 1, tmp_path, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}))
    trace = json.loads((tmp_path / "ckpt" / "trace" / "torch_rank0.json").read_text())
    assert any("aten::" in e.get("name", "") for e in trace["traceEvents"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert len(read_metrics(tmp_path / "ckpt")) == STEPS  # metrics.jsonl is written whatever the backend


def test_config_file_holds_flags_and_the_command_line_wins(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model-name: /models/x\ntask_name: a.jsonl:1\nlr: 0.002\nfp16: true\nnum-layers: 3,2\n")
    args = parse_args(["--config", str(config), "--lr", "0.5"])
    assert (args.model_name, args.task_name, args.lr, args.fp16, args.num_layers) == (
        "/models/x", "a.jsonl:1", 0.5, True, (3, 2))  # fmt: skip
    config.write_text("model-name: /models/x\ntask-name: a.jsonl\nlearning-rate: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])


def test_help_is_grouped_and_every_flag_explained() -> None:
    parser = build_parser()
    titles = {g.title for g in parser._action_groups}
    assert {"model", "data", "batch", "optimization", "distributed", "device", "checkpoints and logs"} <= titles
    for action in parser._actions:
        assert action.help and action.help.strip() not in ("-", ""), action.dest


@pytest.mark.ranks
def test_launch_local_stops_every_rank_on_ctrl_c(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    import psutil

    args = args_for(tiny_shards, two_tasks, tmp_path / "ckpt", steps=100000, seq=64)
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    # as a terminal's Ctrl-C finds it: a harness started in the background (nohup cmd &) runs
    # with SIGINT ignored, which the script would inherit and then could not trap
    script = subprocess.Popen(["bash", str(ROOT / "example_scripts" / "launch_local.sh"), "2",
                               "--dist-url", f"tcp://127.0.0.1:{free_port()}", *args],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ckpt" / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = psutil.Process(script.pid).children()
        assert len(ranks) == 2
        script.send_signal(signal.SIGINT)
        assert script.wait(timeout=60) == 130  # a hang detector: Ctrl-C must end the script
        _gone, alive = psutil.wait_procs(ranks, timeout=15)
        assert not alive
        # the ranks stopped as for a preemption notice: the step they were in is committed
        stopped = max(r["step"] for r in read_metrics(tmp_path / "ckpt") if "loss" in r)
        assert int((tmp_path / "ckpt" / "latest").read_text()) == stopped
    finally:
        for child in psutil.Process(script.pid).children() if script.poll() is None else []:
            child.kill()
        script.kill()


def test_pipeline_sums_gather_each_stage_s_slot_and_add_the_rest() -> None:
    """Two stages' named statistics through a loopback all-reduce: plain names add up, per-stage
    names come back as each stage's own value in its slot, in float64 (byte counts past 2**24)."""
    import torch

    from observability.metrics import PipelineSums

    stages = [PipelineSums(s, 2) for s in range(2)]
    for s, sums in enumerate(stages):
        sums.add("comm_bytes", 2**40 + s)
        sums.add("peak", 100 + s, per_stage=True)
        sums.add("lost", 0.0)
    tensors = []

    def all_reduce(tensor: torch.Tensor) -> None:  # the sum of both stages' tensors, in place
        tensors.append(tensor)
        if len(tensors) == 2:
            total = tensors[0] + tensors[1]
            for t in tensors:
                t.copy_(total)

    stages[0].reduce(all_reduce, torch.device("cpu"))  # its view is read before the other stage adds in
    summed = stages[1].reduce(all_reduce, torch.device("cpu"))
    assert summed == {"comm_bytes": [2**41 + 1], "peak": [100.0, 101.0], "lost": [0.0]}


def test_named_totals_come_back_by_name_in_the_first_value_s_dtype() -> None:
    """A step's totals on two replicas, laid end to end and summed as one tensor: each name reads
    back its own summed values, whatever was added before or after it."""
    import torch

    from observability.metrics import NamedTotals

    replicas = []
    for r in range(2):
        named = NamedTotals()
        named.add("loss", torch.tensor(1.5 + r))
        named.add("pairs", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * (r + 1))
        notices = torch.zeros(2)
        notices[r] = float(r == 1)
        named.add("notices", notices)
        replicas.append(named)
    flats = [named.flat() for named in replicas]
    assert flats[0].dtype == torch.float32 and flats[0].numel() == 6
    summed = replicas[0].read(flats[0] + flats[1])
    assert summed["loss"].tolist() == [4.0]
    assert summed["pairs"].tolist() == [3.0, 6.0, 9.0]
    assert summed["notices"].tolist() == [0.0, 1.0]


def test_a_log_that_is_no_terminal_holds_no_progress_bars(tmp_path: Path) -> None:
    """The quickstart's tools write plain lines into a log file: no carriage returns of progress
    bars (HF's loading and writing bars, the tokenizer trainer's) and no blank lines."""
    import subprocess
    import sys

    from tests.helpers import BUNDLED_CORPUS, OFFLINE_ENV, ROOT

    env = {**os.environ, **OFFLINE_ENV}
    model = tmp_path / "tiny-hf"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    for command in (
        ["convert/tiny_model.py", "--save-dir", str(model), "--corpus", str(BUNDLED_CORPUS), "--num-layers", "1"],
        ["example_scripts/show_result.py", "--model", str(model), "--metrics", str(tmp_path / "metrics.jsonl"),
         "--max-new-tokens", "2"],
    ):  # fmt: skip
        out = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        log = out.stdout + out.stderr
        assert "\r" not in log and "\n\n" not in log and not log.startswith("\n"), log
        assert "wrote tiny" in log or "generation:" in log


def test_on_a_terminal_log_lines_go_above_the_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reporting rank's bar and its log lines share the terminal: a line is written after the
    bar is cleared (and the bar drawn again below it), never into the bar's own line."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(terminal)  # as basicConfig makes it: onto sys.stderr
    logging.getLogger().addHandler(handler)
    try:
        progress = Progress(total=10, done=0)
        row = {"loss": 1.25, "lr": 1e-3, "tokens_per_s": 23815.0}
        progress.update(row)
        logging.getLogger("trainer.loop").warning("a line of the log")
        progress.update(row)
        progress.close()
    finally:
        logging.getLogger().removeHandler(handler)
    shown = terminal.getvalue()
    assert "tok_s=23815" in shown  # the bar was drawn
    (line,) = [line for line in shown.split("\n") if "a line of the log" in line]
    assert line.rsplit("\r", 1)[-1].strip() == "a line of the log", repr(line)  # not after the bar's text
    assert handler.stream is terminal  # the handler writes directly again once the bar is gone
