"""Golden runs: record what a set of small runs produce, and check a later tree produces the same.

A refactor that must not change behaviour records the runs before it and checks them after it:

    python -m tests.golden record golden.json     # on the tree before the change
    python -m tests.golden check golden.json      # on the tree after it: every value must be equal

Each run (a schedule, or a data-parallel strategy, on the tiny model at pp=2 x dp=2) gives its loss
per step, exactly as metrics.jsonl has it, and the SHA-256 of every safetensors file of its last
checkpoint (weights, optimizer state, DiLoCo's outer state; they hold no paths or times). Equal
hashes mean equal bits. The figures depend on the machine's floating-point kernels, so a record
is only compared on the machine that made it: this is a tool for a change, not a test for CI
(tests compare against Hugging Face's model instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

from convert.from_hf import convert_from_hf
from tests.helpers import assert_all_ok, launch, read_metrics, tiny_gptneox, two_task_spec
from tests.pp2_dp2 import elastic_args

log = logging.getLogger("golden")

# name -> flags added to the pp=2 x dp=2 run of tests/pp2_dp2.py (40 steps, checkpoints every 8)
RUNS: dict[str, list[str]] = {
    "gpipe": ["--pp-mode", "gpipe"],
    "1f1b": ["--pp-mode", "1f1b"],
    "zb1": ["--pp-mode", "zb1"],
    "one-message": ["--dp-bucket-mb", "0"],
    "compressed": ["--dp-compress", "int8"],
    "compressed-buckets": ["--dp-compress", "topk", "--dp-bucket-mb", "0.01"],
    "sharded": ["--shard-optimizer"],
    "fp16": ["--fp16", "--dp-bucket-mb", "0.01"],
    "local": ["--dp-mode", "local", "--sync-every", "4"],
    "diloco": ["--dp-mode", "diloco", "--sync-every", "4", "--diloco-fragments", "2", "--diloco-overlap-steps", "1"],
    "diloco-int8": ["--dp-mode", "diloco", "--sync-every", "4", "--dp-compress", "int8"],
    "elastic": ["--elastic", "--min-replicas", "1"],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_run(name: str, shards: Path, tasks: str, root: Path) -> dict:
    tmp = root / name
    tmp.mkdir()
    args = [*elastic_args(shards, tasks, tmp / "ckpt"), *RUNS[name]]
    assert_all_ok(launch(args, 4, tmp))
    ckpt = tmp / "ckpt"
    losses = {r["step"]: r["loss"] for r in read_metrics(ckpt) if "loss" in r and "step" in r and "eval" not in r}
    last = max(int(p.name.split("_")[-1]) for p in ckpt.glob("checkpoint_*"))
    files = {str(p.relative_to(ckpt)): sha256(p) for p in sorted(ckpt.rglob("*.safetensors"))}
    return {"losses": losses, "last_checkpoint": last, "files": files}


def record_all(names: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        root = Path(tmp)  # the model and tasks of the tests' fixtures (tests/conftest.py)
        shards = convert_from_hf(tiny_gptneox(root / "tiny_hf"), root / "shards")
        tasks = two_task_spec(root)
        results = {}
        for name in names:
            log.info("run %s", name)
            results[name] = one_run(name, shards, tasks, root)
        return json.loads(json.dumps(results))  # step numbers as the JSON file has them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these runs only (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.only or list(RUNS)
    results = record_all(names)
    if args.action == "record":
        args.file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        log.info("recorded %d runs in %s", len(results), args.file)
        return 0
    golden = json.loads(args.file.read_text())
    differ = [name for name in names if golden.get(name) != results[name]]
    for name in names:
        log.info("%s: %s", name, "DIFFERS" if name in differ else "equal")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
