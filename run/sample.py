"""A run that only samples (``--sample-prompts``): the ranks load the model as training would
(``--model-name``, the LoRA adapters, the latest checkpoint of ``--checkpoint-path`` when
``--load-checkpoint``), generate completions of a prompts file through the pipeline
(generation/), and rank 0 writes one JSON line per prompt. A model too big for one GPU is
sampled over the same launch it trains on, without exporting it."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from comm.process_group import Communicator
from data.chat import ChatTemplate
from generation.engine import PromptBatch, Stops, completions, generate
from generation.prompts import Prompt, end_of_sequence_ids, read_prompts
from generation.sampling import Sampler
from modules.layout import checkpoint_dir, latest_step
from pipeline.stage import Stage
from trainer.checkpoint import check_same_kind
from trainer.config import RunConfig
from trainer.precision import compute_dtype
from trainer.startup import Plan, plan_stage

log = logging.getLogger(__name__)


def load_stage(cfg: RunConfig, plan: Plan, device: torch.device) -> tuple[Stage, str]:
    """This rank's stage with the weights to sample, and what they are (for the log)."""
    topo = cfg.topology
    stage = Stage(plan.family, plan.model_config, plan.layers, topo.is_first_stage, topo.is_last_stage, device=device)
    stage.load_parts(cfg.model.model_name)
    if cfg.lora is not None:
        stage.add_lora(cfg.lora, cfg.data.seed, compute_dtype(cfg.optim.precision))
    source = str(cfg.model.model_name)
    step = latest_step(cfg.checkpoint.path) if cfg.checkpoint.resume else None
    if step is not None:
        directory = checkpoint_dir(cfg.checkpoint.path, step)
        check_same_kind(directory, stage.lora, cfg.model.model_name)
        stage.load_saved(str(directory))  # replica 0's files: every replica's weights after a step
        source = f"checkpoint {step} of {cfg.checkpoint.path}"
    return stage.to(device).eval(), source


def completion_rows(
    prompts: list[Prompt], tokens: list[torch.Tensor], eos: tuple[int, ...], tokenizer: object
) -> list[dict]:
    """One row per prompt: its completion up to and including the first end-of-sequence token."""
    return [{"line": prompt.line, "prompt": prompt.prompt, **prompt.columns,
             "completion": tokenizer.decode(kept, skip_special_tokens=True), "completion_ids": kept,
             "finish_reason": "length" if cut else "stop"}
            for prompt, (kept, cut) in zip(prompts, completions(tokens, eos), strict=True)]  # fmt: skip


def sample(cfg: RunConfig) -> None:
    gen, topo = cfg.generation, cfg.topology
    if cfg.objective.name != "lm":
        raise ValueError(f"--sample-prompts samples a causal LM; drop --objective {cfg.objective.name}")
    plan = plan_stage(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name)
    template = ChatTemplate(tokenizer, cfg.data.chat_template)
    room = cfg.data.seq_length - gen.sampling.max_completion_length
    prompts = read_prompts(gen.prompts, tokenizer, template, room)  # every rank: bad input before any waits
    eos = end_of_sequence_ids((cfg.model.model_name, cfg.model.tokenizer_name), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = torch.device(cfg.device)
    comm = Communicator.connect(topo, cfg.comm, device)
    try:
        stage, source = load_stage(cfg, plan, device)
        mine = prompts[topo.replica :: topo.data_size]  # each replica's pipeline samples its share
        size = cfg.batch.micro_batch_size
        batches = [PromptBatch.left_padded([p.ids for p in mine[i : i + size]], pad, device)
                   for i in range(0, len(mine), size)]  # fmt: skip
        sampler = (
            Sampler(gen.sampling, cfg.data.seed + 1_000_003 * topo.replica, device) if topo.is_last_stage else None
        )
        if topo.rank == 0:
            log.info("sampling %s: %d prompts, %d micro-batches of %d per pipeline, %d in flight", source,
                     len(prompts), len(batches), size, gen.in_flight_for(topo.pipeline_size))  # fmt: skip
        started = time.perf_counter()
        tokens = generate(stage, comm, batches, Stops(eos, gen.sampling.max_completion_length, pad), sampler,
                          gen.in_flight_for(topo.pipeline_size), compute_dtype(cfg.optim.precision))  # fmt: skip
        rows = completion_rows(mine, tokens, eos, tokenizer) if topo.is_last_stage else None  # (the first has them too)
        took = time.perf_counter() - started
        gathered = comm.all_gather_object(rows)
        if topo.rank == 0:
            by_line = sorted((row for part in gathered if part for row in part), key=lambda row: row["line"])
            write_rows(gen.output, by_line)
            new = sum(len(row["completion_ids"]) for row in by_line)
            log.info("wrote %d completions to %s: %d new tokens in %.2fs (%.1f tokens/s)", len(by_line), gen.output,
                     new, took, new / max(took, 1e-9))  # fmt: skip
    except BaseException as err:
        comm.close(error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
        raise
    comm.close()


def write_rows(path: Path, rows: list[dict]) -> None:
    """A new file, whole or not at all: written beside it, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if path.exists():
        raise FileExistsError(f"--sample-output {path} appeared while sampling; the completions are in {partial}")
    os.replace(partial, path)
