"""Shared by the benchmarks: a small GPT-NeoX built offline, and a run of real ranks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.netns import NetHosts
from comm.rendezvous import free_port
from convert.from_hf import convert_from_hf
from convert.tiny_model import read_texts, tiny_config, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def link_parser(doc: str, bandwidths: str, steps: int, what: str) -> argparse.ArgumentParser:
    """The flags of a benchmark over slow links: the rates, steps per run, and --real-link (the
    kernel shapes a veth between two namespaces instead of the ranks holding their sends)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths", default=bandwidths, help=f"link rates {what} in Mbit/s")
    parser.add_argument("--steps", type=int, default=steps, help="steps per run (the first is not timed)")
    parser.add_argument(
        "--real-link",
        action="store_true",
        help="run the ranks on two network namespaces shaped by tc tbf (root) instead of emulating",
    )
    return parser


def emulated_link_args(doc: str, steps: int) -> argparse.Namespace:
    """The flags of a benchmark whose ranks hold every send to one emulated rate (--mbps), and
    the number of steps; logs its findings as plain lines."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbps", type=float, default=20.0, help="emulated link rate of every rank's sends")
    parser.add_argument("--steps", type=int, default=steps)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args


def build_model(folder: Path, corpus: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(read_texts(corpus), vocab_size=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gptneox", len(tokenizer), num_layers=4, hidden=256, heads=8))
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    return convert_from_hf(folder / "hf", folder / "shards")


def rank_core(rank: int) -> int:
    """The core that rank ``rank`` of a benchmark is pinned to: one core per rank, as on separate GPUs."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[rank % len(cores)]


def run(
    shards: Path,
    corpus: Path,
    out: Path,
    steps: int,
    flags: list[str],
    hosts: NetHosts | None = None,
    pin: bool = False,
    host_of: Callable[[int], str] | None = None,
) -> list[dict]:
    """Train with ``flags`` (which set the topology; one rank unless they say otherwise, and win
    over the defaults below) and return metrics.jsonl. With ``hosts``, rank r runs on test host
    ``host_of(r)`` ("ab"[r] by default: two ranks) over its veth. With ``pin``, rank r runs on
    core ``rank_core(r)`` alone."""
    port = free_port()
    master = hosts.address("a") if hosts else "127.0.0.1"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    common = ["--model-name", str(shards), "--task-name", str(corpus),
              "--seq-length", "256", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-3",
              "--total-steps", str(steps), "--checkpoint-path", str(out), "--checkpoint-steps", "1000",
              "--dist-url", f"tcp://{master}:{port}", "--log-level", "WARNING", *flags]  # fmt: skip
    world = 1
    for size in ("--pipeline-group-size", "--data-group-size"):
        world *= int(flags[flags.index(size) + 1]) if size in flags else 1
    procs = []
    for rank in range(world):
        argv = [sys.executable, str(ROOT / "dist_clm_train.py"), "--rank", str(rank), *common]
        if pin:
            argv = ["taskset", "-c", str(rank_core(rank)), *argv]
        if hosts is not None:
            host = host_of(rank) if host_of else "ab"[rank]
            argv = hosts.command(host, [*argv, "--net-interface", hosts.interface(host)])
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env))
    if any(p.wait() for p in procs):
        raise RuntimeError(f"a rank failed with flags {flags}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def largest_stage_bytes(checkpoint: Path) -> int:
    """Bytes of the largest stage's files in ``checkpoint`` (weights and AdamW state, by its
    manifests): what a stage's state takes to send over a link."""
    stages = [json.loads(p.read_text()) for p in sorted(checkpoint.glob("manifest_stage*.json"))]
    return max(sum(entry["bytes"] for entry in manifest.values()) for manifest in stages)


def metric_rows(out: Path) -> list[dict]:
    """The rows of ``out``'s metrics.jsonl so far (none before the first step; a row the run is
    still writing, with no newline yet, is not one)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def wait_for_step(out: Path, step: int, procs: list[subprocess.Popen]) -> None:
    """Until a training row of step ``step`` (or later) is in ``out``'s metrics."""
    while not any(r.get("step", 0) >= step and "loss" in r for r in metric_rows(out)):
        if all(p.poll() is not None for p in procs):
            raise RuntimeError("every rank stopped")
        time.sleep(0.05)
