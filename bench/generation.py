"""Greedy generation through a 2-stage pipeline against HF's ``generate`` in one process, and
decoding over an emulated slow link with more micro-batches in flight.

    python bench/generation.py [--prompts 16] [--new-tokens 48] [--latency-ms 50]

A random LLaMA (hidden 512, 8 layers, vocabulary 1024) samples the same prompts (32 tokens
each, micro-batches of 2) three ways, side by side in one run: HF's ``generate`` in one
process on one core; ``--sample-prompts`` at pp=2 (each rank on its own core) with 1, 2 and 4
micro-batches in flight; and again with every decode message delayed by ``--latency-ms``, where
one micro-batch's token needs p = 2 hops, so m in flight bound the rate at
m x rows / (p x latency) tokens/s. Prints tokens/s, the ratio to HF's, and that bound.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import rank_core  # noqa: E402
from comm.rendezvous import free_port  # noqa: E402
from convert.from_hf import convert_from_hf  # noqa: E402
from convert.tiny_model import read_texts, tiny_config, train_tokenizer  # noqa: E402

log = logging.getLogger("bench.generation")
MICRO, PROMPT_TOKENS, STAGES = 2, 32, 2
RATE = re.compile(r"(\d+) new tokens in ([\d.]+)s")


def build(folder: Path) -> tuple[Path, list[str]]:
    """The model, and prompts of the bundled texts that are each PROMPT_TOKENS tokens long."""
    import torch
    from transformers import AutoModelForCausalLM

    corpus = ROOT / "example_scripts" / "data" / "tiny.jsonl"
    tokenizer = train_tokenizer(read_texts(corpus), vocab_size=1024)
    torch.manual_seed(0)
    config = tiny_config("llama", len(tokenizer), num_layers=8, hidden=512, heads=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    prompts = [tokenizer.decode(tokenizer(text)["input_ids"][:PROMPT_TOKENS]) for text in read_texts(corpus)]
    prompts = [p for p in prompts if len(tokenizer(p)["input_ids"]) == PROMPT_TOKENS]
    return convert_from_hf(folder / "hf", folder / "shards"), prompts


def hf_rate(hf: Path, prompts: list[str], new: int) -> float:
    """HF's generate, micro-batch by micro-batch, one thread: new tokens per second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    eos = tokenizer.eos_token_id
    tokens, started = 0, time.perf_counter()
    for i in range(0, len(prompts), MICRO):
        batch = tokenizer(prompts[i : i + MICRO], return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():  # counted as the pipeline counts: to EOS
            tokens += row.index(eos) + 1 if eos in row else len(row)
    return tokens / (time.perf_counter() - started)


def pipeline_rate(shards: Path, prompts_file: Path, out: Path, new: int, flags: list[str]) -> float:
    """``--sample-prompts`` at pp=2, each rank on its own core: new tokens per second of decoding."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    port = free_port()
    procs = []
    for rank in range(STAGES):
        argv = ["taskset", "-c", str(rank_core(rank)), sys.executable, str(ROOT / "dist_clm_train.py"),
                "--rank", str(rank), "--model-name", str(shards), "--pipeline-group-size", str(STAGES),
                "--dist-url", f"tcp://127.0.0.1:{port}", "--sample-prompts", str(prompts_file), "--sample-output",
                str(out), "--temperature", "0", "--max-completion-length", str(new), "--micro-batch-size",
                str(MICRO), "--batch-size", str(MICRO), "--seq-length", str(PROMPT_TOKENS + new),
                "--checkpoint-path", str(out.parent / "none"), *flags]  # fmt: skip
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank failed with flags {flags}:\n{logs[0][-2000:]}")
    found = RATE.search(logs[0])
    return int(found.group(1)) / float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shards, prompts = build(folder)
        prompts = prompts[: args.prompts]
        prompts_file = folder / "prompts.jsonl"
        with open(prompts_file, "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
        reference = hf_rate(folder / "hf", prompts, args.new_tokens)
        log.info("%d prompts of %d tokens, %d new each, micro-batches of %d\n", len(prompts), PROMPT_TOKENS,
                 args.new_tokens, MICRO)  # fmt: skip
        log.info("%-44s %10s %8s %12s", "", "tokens/s", "vs HF", "bound")
        log.info("%-44s %10.1f %8s %12s", "HF generate, one process, one core", reference, "1.00x", "")
        for m in (1, 2, 4):
            rate = pipeline_rate(shards, prompts_file, folder / f"fast{m}.jsonl", args.new_tokens,
                                 ["--decode-micro-batches", str(m)])  # fmt: skip
            log.info("%-44s %10.1f %7.2fx %12s", f"pp=2, {m} in flight", rate, rate / reference, "")
        for m in (1, 2, 4, 8):
            link = ["--decode-micro-batches", str(m), "--link-latency-ms", str(args.latency_ms)]
            rate = pipeline_rate(shards, prompts_file, folder / f"slow{m}.jsonl", args.new_tokens, link)
            bound = m * MICRO / (STAGES * args.latency_ms / 1e3)
            log.info("%-44s %10.1f %7.2fx %12.1f", f"pp=2, {m} in flight, {args.latency_ms:g} ms links", rate,
                     rate / reference, bound)  # fmt: skip


if __name__ == "__main__":
    main()
