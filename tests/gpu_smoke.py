"""GPU smoke check: the CUDA path end to end, one line per case; exit 1 if any case failed.

    bash tests/gpu_smoke.sh                                 # every case this machine's GPUs allow
    bash tests/gpu_smoke.sh --cases pp1-fp32,gloo-lora-bf16 # some of them
    bash tests/gpu_smoke.sh --cpu                           # the same runs on the CPU: checks the script

Every case trains the quickstart's model (a tiny GPT-NeoX of 4 layers, built offline) for 10
steps on the bundled data and compares its loss per step with a reference run of the same
global batches:

    pp1-fp32                 one rank on cuda:0             vs the CPU run          max |diff| <= 1e-4
    gloo-{gpipe,1f1b,zb1}-fp32  pp=2 x dp=2 over Gloo, CUDA vs the CPU run                      1e-4
                             compute, ranks sharing the GPUs there are
    gloo-{gpipe,1f1b,zb1}-{bf16,fp16}                       vs one CUDA rank in that precision  5e-3
    gloo-lora-bf16           LoRA rank 4 under bf16         vs one CUDA rank, LoRA bf16         5e-3
    gloo-sharded-1f1b-fp32   --shard-optimizer              vs the CPU run                      1e-4
    nccl-...                 the same over NCCL, one GPU per rank (2+ GPUs: pp=2 x dp=GPUs//2, at most 2)
    torchrun-nccl-1f1b-fp32  torchrun --nproc-per-node: each rank on cuda:$LOCAL_RANK, checked in its log

fp32 on a GPU and on a CPU differ by kernel rounding only (~1e-6 per step here); 16-bit runs
differ from one rank by the stage boundary's rounding and a different summation order, well under
5e-3, while a gradient summed wrongly or a lost micro-batch moves the loss by 1e-2 or more.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.helpers import BUNDLED_CORPUS, OFFLINE_ENV, ROOT, bundled_texts, launch, read_metrics, train_args

FP32_TOL, HALF_TOL = 1e-4, 5e-3
LORA_FLAGS = ["--lora-rank", "4", "--lora-dropout", "0"]


@dataclass(frozen=True)
class Run:
    """One training run: its ranks' layout, backend, precision and extra flags."""

    name: str
    pp: int = 1
    dp: int = 1
    backend: str = "gloo"
    precision: str = "fp32"
    pp_mode: str = "gpipe"
    lora: bool = False
    shard: bool = False
    cuda: bool = True
    torchrun: bool = False


@dataclass
class Case:
    run: Run
    reference: Run
    tolerance: float
    needs_gpus: int = 1
    extra: list[str] = field(default_factory=list)


def cases(gpus: int) -> list[Case]:
    """Every case, in the order they run (references are run when first needed)."""
    cpu_ref = Run("ref-cpu-fp32", cuda=False)
    refs = {p: Run(f"ref-pp1-{p}", precision=p) for p in ("bf16", "fp16")}
    lora_ref = Run("ref-pp1-lora-bf16", precision="bf16", lora=True)
    out = [Case(Run("pp1-fp32"), cpu_ref, FP32_TOL)]
    nccl_dp = max(1, min(2, gpus // 2))
    for backend, dp, needs in (("gloo", 2, 1), ("nccl", nccl_dp, 2)):
        for precision in ("fp32", "bf16", "fp16"):
            for mode in ("gpipe", "1f1b", "zb1"):
                run = Run(f"{backend}-{mode}-{precision}", 2, dp, backend, precision, mode)
                ref = cpu_ref if precision == "fp32" else refs[precision]
                out.append(Case(run, ref, FP32_TOL if precision == "fp32" else HALF_TOL, needs))
        out.append(Case(Run(f"{backend}-lora-bf16", 2, dp, backend, "bf16", lora=True), lora_ref, HALF_TOL, needs))
        sharded = Run(f"{backend}-sharded-1f1b-fp32", 2, dp, backend, pp_mode="1f1b", shard=True)
        out.append(Case(sharded, cpu_ref, FP32_TOL, needs))
    torchrun = Run("torchrun-nccl-1f1b-fp32", 2, nccl_dp, "nccl", pp_mode="1f1b", torchrun=True)
    out.append(Case(torchrun, cpu_ref, FP32_TOL, 2))
    return out


class Smoke:
    def __init__(self, workdir: Path, cpu: bool) -> None:
        from convert.from_hf import convert_from_hf
        from convert.tiny_model import build_tiny_model

        self.workdir, self.cpu = workdir, cpu
        self.gpus = 0 if cpu else torch.cuda.device_count()
        hf = build_tiny_model(workdir / "tiny-hf", bundled_texts(), "gptneox", num_layers=4, seed=0)
        self.shards = convert_from_hf(hf, workdir / "tiny-shards")
        self.losses: dict[str, list[float]] = {}

    def flags(self, run: Run, ckpt: Path) -> list[str]:
        per_replica = 4 // run.dp  # every run trains on the same global batches of 4 sequences
        args = train_args(self.shards, str(BUNDLED_CORPUS), ckpt, run.pp, run.dp, per_replica, 1, 1)
        args += ["--pp-mode", run.pp_mode, "--dist-backend", run.backend, "--dp-backend", run.backend]
        args += ["--use-cuda", "true" if run.cuda and not self.cpu else "false", "--checkpoint-steps", "100"]
        args += {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[run.precision]
        return args + (LORA_FLAGS if run.lora else []) + (["--shard-optimizer"] if run.shard else [])

    def train(self, run: Run) -> list[float]:
        """The loss of every step of ``run`` (cached); raises RuntimeError naming a failed rank."""
        if run.name in self.losses:
            return self.losses[run.name]
        folder = self.workdir / run.name
        folder.mkdir()
        ckpt, world = folder / "ckpt", run.pp * run.dp
        args = self.flags(run, ckpt)
        if run.torchrun:
            outputs = [self._torchrun(args, world, folder)]
        else:
            gpus = max(1, self.gpus)
            on_gpu = run.cuda and not self.cpu
            rank_args = (lambda r: ["--cuda-id", str(r % gpus)]) if on_gpu else None
            results = launch(args, world, folder, timeout=900, rank_args=rank_args)
            failed = [r for r in results if r.returncode != 0]
            if failed:
                last = (failed[0].output.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"rank {failed[0].rank} exited {failed[0].returncode}: {last}")
            outputs = [r.output for r in results]
        if run.cuda and not self.cpu:
            self._check_devices(run, outputs)
        self.losses[run.name] = [r["loss"] for r in read_metrics(ckpt) if "loss" in r]
        return self.losses[run.name]

    def _torchrun(self, args: list[str], world: int, folder: Path) -> str:
        env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(ROOT / "dist_clm_train.py"), *args]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        (folder / "torchrun.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            last = ((done.stdout + done.stderr).strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"torchrun exited {done.returncode}: {last}")
        return done.stdout + done.stderr

    def _check_devices(self, run: Run, outputs: list[str]) -> None:
        """Each rank logs its device at start: rank r must be on cuda:(r mod GPUs), which is
        its --cuda-id here and its LOCAL_RANK under torchrun (one node: rank = local rank)."""
        found = {}
        for out in outputs:
            for stage, replica, device in re.findall(r"\[stage (\d+) \| replica (\d+)\].*threads, (cuda:\d+)", out):
                found[int(replica) * run.pp + int(stage)] = device
        expected = {rank: f"cuda:{rank % max(1, self.gpus)}" for rank in range(run.pp * run.dp)}
        if found != expected:
            raise RuntimeError(f"ranks logged devices {found}, expected {expected}")

    def check(self, case: Case) -> tuple[bool, str]:
        ours, reference = self.train(case.run), self.train(case.reference)
        if len(ours) != len(reference) or not ours:
            return False, f"{len(ours)} steps logged against the reference's {len(reference)}"
        gap = max(abs(a - b) for a, b in zip(ours, reference, strict=True))
        verdict = gap <= case.tolerance
        return verdict, f"max |loss diff| {gap:.1e} (tolerance {case.tolerance:.0e}) vs {case.reference.name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run every case on the CPU (checks the script only)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--workdir", default=None, help="where runs are written (default: a new temporary folder)")
    args = parser.parse_args(argv)
    gpus = 0 if args.cpu else torch.cuda.device_count()
    todo = cases(gpus)
    if args.cases:
        names = [n for n in args.cases.split(",") if n]
        unknown = [n for n in names if n not in {c.run.name for c in todo}]
        if unknown:
            print(f"gpu_smoke: no case is named {', '.join(unknown)}; cases: {' '.join(c.run.name for c in todo)}",
                  file=sys.stderr)  # fmt: skip
            return 2
        todo = [c for c in todo if c.run.name in names]
    if not args.cpu and gpus == 0:
        print("gpu_smoke: no CUDA device is visible (torch.cuda.device_count() == 0); --cpu checks the script",
              file=sys.stderr)  # fmt: skip
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    workdir.mkdir(parents=True, exist_ok=True)
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    print(f"gpu_smoke: torch {torch.__version__}, {gpus} GPU(s) {names}, runs in {workdir}", flush=True)
    smoke = Smoke(workdir, args.cpu)
    failures = 0
    for case in todo:
        if args.cpu and case.run.backend == "nccl":
            print(f"SKIP {case.run.name}: NCCL needs GPUs", flush=True)
            continue
        if gpus < case.needs_gpus and not args.cpu:
            print(f"SKIP {case.run.name}: needs {case.needs_gpus} GPUs, this machine has {gpus}", flush=True)
            continue
        started = time.monotonic()
        try:
            ok, detail = smoke.check(case)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as err:
            ok, detail = False, str(err)
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {case.run.name}: {detail}, {time.monotonic() - started:.0f} s", flush=True)
    print(f"gpu_smoke: {failures} case(s) failed" if failures else "gpu_smoke: every case passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
