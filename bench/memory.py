"""Memory at a real model size: converters, recomputation, the sharded optimizer, the estimate.

    python bench/memory.py [--parts converters,activations,sharding]

Builds a GPT-NeoX of Pythia-410m's shape (405M parameters, random weights, no download), then
1. runs convert/from_hf.py and convert/to_hf.py and prints each one's peak resident memory
   beside the bound 0.6 GB + 2 x the largest part;
2. trains it 2 steps at pp=2 (GPipe, seq 1024, micro-batch 1, m=4): as before this round's
   changes (full logits kept by the loss, no recomputation), with the chunked loss, and with
   the chunked loss and --activation-checkpointing full. For each stage it prints the peak of
   step 1 (forwards and backwards only: AdamW's moments do not exist yet) less the bare process
   and the weights and gradients, which is the activation share, and the peak of step 2 (which
   also spans step 1's optimizer update) beside the weights, gradients and AdamW moments;
3. trains it 2 steps at pp=2 x dp=2 (seq 256, 4 ranks) without and with --shard-optimizer and
   prints each stage's step-2 peak in both;
4. for every run above, prints each stage's measured step-2 peak beside the start-up estimate
   the trainer writes into metrics.jsonl (peak_mem_estimate_bytes_stage<s>).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import run  # noqa: E402
from convert.tiny_model import read_texts, train_tokenizer  # noqa: E402

log = logging.getLogger("bench.memory")
CORPUS = ROOT / "example_scripts" / "data" / "tiny.jsonl"
PARTS = ("converters", "activations", "sharding")
# Pythia-410m's 24 layers as 12 + 12 (the split by parameters), pinned so the figures stay
# comparable whatever the default split chooses at each sequence length
SPLIT = (12, 12)
NUM_LAYERS = ",".join(map(str, SPLIT))
_PEAK = """
import runpy, sys
sys.argv = sys.argv[1:]
if sys.argv:
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    import torch, transformers, trainer.loop  # what a rank imports before it builds anything
print("peak-kB", [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1])
"""


def peak_gb(args: list[str]) -> float:
    done = subprocess.run([sys.executable, "-c", _PEAK, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(done.stdout.split("peak-kB")[-1].split()[0]) * 1024 / 1e9


def build_410m(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        rotary_pct=0.25, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    train_tokenizer(read_texts(CORPUS), vocab_size=1024).save_pretrained(folder)
    return folder


def stage_values(shards: Path, stage: int) -> int:
    """Parameters of one stage of pp=2 split as the runs here are (``SPLIT``)."""
    from modules import family_for, load_config
    from trainer.startup import part_sizes

    config = load_config(shards)
    embedding, layer, head = part_sizes(family_for(config.model_type), config)
    return layer * SPLIT[stage] + (embedding if stage == 0 else head)


def main() -> None:
    # Freed memory goes back to the system at once (glibc keeps small freed blocks otherwise), so
    # a rank's resident set follows what it holds, not what loading its weights once needed.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default: all)"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts {args.parts}: choose from {', '.join(PARTS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = build_410m(tmp / "hf")
        shards, out = tmp / "shards", tmp / "out"
        from_hf = peak_gb(["convert/from_hf.py", "--model-name", str(hf), "--save-dir", str(shards)])
        if "converters" in parts:
            to_hf = peak_gb(["convert/to_hf.py", "--ckpt-path", str(shards), "--save-path", str(out)])
            largest = max(p.stat().st_size for p in shards.glob("*.safetensors")) / 1e9
            model = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 1e9
            bound = 0.6 + 2 * largest
            log.info("model %.2f GB, largest part %.2f GB, bound 0.6 + 2 x part = %.2f GB", model, largest, bound)
            log.info("from_hf peak %.2f GB, to_hf peak %.2f GB", from_hf, to_hf)
        if "activations" in parts:
            activations(shards, tmp)
        if "sharding" in parts:
            sharding(shards, tmp)


def activations(shards: Path, tmp: Path) -> None:
    """pp=2, seq 1024, m=4: the logits kept, the chunked loss, and recomputation too."""
    bare = peak_gb([])
    log.info("a bare rank process (imports only): %.2f GB", bare)
    log.info("%-24s %5s %12s %12s %12s %12s", "run", "stage", "step-1 peak", "activations", "step-2 peak",
             "+AdamW GB")  # fmt: skip
    share, estimates = {}, {}
    runs = {
        "logits kept (before)": ["--loss-chunk-tokens", "0"],
        "chunked loss": ["--loss-chunk-tokens", "256"],
        "chunked + recompute": ["--loss-chunk-tokens", "256", "--activation-checkpointing", "full"],
    }
    for name, extra in runs.items():
        flags = ["--pipeline-group-size", "2", "--num-layers", NUM_LAYERS, "--seq-length", "1024",
                 "--batch-size", "4", "--micro-batch-size", "1", *extra]  # fmt: skip
        rows = run(shards, CORPUS, tmp / name.replace(" ", "-"), 2, flags)
        for stage in (0, 1):
            estimates[(name, stage)] = measured_and_estimate(rows, stage)
            values = stage_values(shards, stage)
            first, second = (rows[i][f"peak_mem_bytes_stage{stage}"] / 1e9 for i in (0, 1))
            share[(name, stage)] = first - bare - 8 * values / 1e9  # fp32 weights and gradients
            log.info("%-24s %5d %12.2f %12.2f %12.2f %12.2f", name, stage, first, share[(name, stage)], second,
                     16 * values / 1e9)  # fmt: skip
    for stage in (0, 1):
        before = share[("logits kept (before)", stage)]
        log.info(
            "stage %d: activation share %.1fx smaller with the chunked loss, %.1fx with recomputation too",
            stage,
            before / share[("chunked loss", stage)],
            before / share[("chunked + recompute", stage)],
        )
    log_estimates(estimates)


def sharding(shards: Path, tmp: Path) -> None:
    """pp=2 x dp=2 (4 ranks) with and without --shard-optimizer: each rank's step-2 peak."""
    flags = ["--pipeline-group-size", "2", "--num-layers", NUM_LAYERS, "--data-group-size", "2",
             "--seq-length", "256", "--batch-size", "2", "--micro-batch-size", "1"]  # fmt: skip
    estimates = {}
    for name, extra in (("pp2 x dp2", []), ("pp2 x dp2 --shard-optimizer", ["--shard-optimizer"])):
        rows = run(shards, CORPUS, tmp / name.replace(" ", "-"), 2, [*flags, *extra])
        for stage in (0, 1):
            estimates[(name, stage)] = measured_and_estimate(rows, stage)
    for stage in (0, 1):
        values = stage_values(shards, stage)
        plain, sharded = estimates[("pp2 x dp2", stage)][0], estimates[("pp2 x dp2 --shard-optimizer", stage)][0]
        log.info("stage %d: step-2 peak %.2f GB unsharded, %.2f GB sharded: %.2f GB less (AdamW moments of half "
                 "the stage: %.2f GB)", stage, plain, sharded, plain - sharded, 4 * values / 1e9)  # fmt: skip
    log_estimates(estimates)


def measured_and_estimate(rows: list[dict], stage: int) -> tuple[float, float]:
    """Step 2's peak (it spans step 1's update) and the start-up estimate, in GB."""
    return rows[1][f"peak_mem_bytes_stage{stage}"] / 1e9, rows[1][f"peak_mem_estimate_bytes_stage{stage}"] / 1e9


def log_estimates(estimates: dict[tuple[str, int], tuple[float, float]]) -> None:
    log.info("measured peak of step 2 beside the start-up estimate:")
    for (name, stage), (measured, estimate) in estimates.items():
        log.info("%-34s stage %d: measured %5.2f GB, estimate %5.2f GB, off by %+5.1f%%", name, stage, measured,
                 estimate, 100 * (estimate - measured) / measured)  # fmt: skip


if __name__ == "__main__":
    main()
