"""A step's rollouts for an objective that generates (GRPO): every stage of a replica's pipeline
generates the completions of its slots' prompts together (generation.engine), then the first
stage builds the sequences to train on and the last stage those and their rewards and
advantages (objectives.rollouts); the middle stages need neither. Sampling draws from (seed,
step, replica) alone, so a resumed run samples what the run it resumes would have."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data.chat import ChatTemplate
from generation.engine import Stops, completions, generate
from generation.prompts import Prompt, PromptStream, end_of_sequence_ids, read_prompts
from generation.sampling import Sampler
from objectives.rollouts import RolloutBatch, generation_batches, replica_prompts, rollout_sums, training_rows
from trainer.precision import compute_dtype

if TYPE_CHECKING:
    from trainer.config import RunConfig
    from trainer.loop import Trainer


def prompt_stream(cfg: RunConfig, tokenizer: object) -> tuple[PromptStream, Stops]:
    """The run's prompts (its one --task-name file, TRL's prompt-only format), in the order the
    seed gives, and where completions end."""
    sampling = cfg.generation.sampling
    template = ChatTemplate(tokenizer, cfg.data.chat_template)
    prompts = read_prompts(
        cfg.data.tasks[0].path, tokenizer, template, cfg.data.seq_length - sampling.max_completion_length
    )
    eos = end_of_sequence_ids((cfg.model.model_name, cfg.model.tokenizer_name), tokenizer)
    if not eos:
        raise ValueError(
            f"{cfg.model.tokenizer_name}: the tokenizer and generation_config.json name no end-of-sequence token, "
            "so no completion could end before --max-completion-length; use the model's own tokenizer"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    stream = PromptStream(prompts, cfg.data.seed, cfg.objective.grpo.num_generations)
    return stream, Stops(eos, sampling.max_completion_length, pad)


def record(folder: Path, replica: int, rows: list[dict]) -> None:
    """Append a step's rollouts to ``rollouts.jsonl`` in the checkpoint folder (another
    replica's: ``rollouts_replica<r>.jsonl``), a line per completion: what it was trained on."""
    name = "rollouts.jsonl" if replica == 0 else f"rollouts_replica{replica}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def rollout(trainer: Trainer, draw: list[Prompt], step: int, stops: Stops) -> RolloutBatch | None:
    """The batch step ``step`` trains on, generated from its prompts ``draw`` (None on the middle stages)."""
    cfg, topo, objective = trainer.cfg, trainer.topo, trainer.objective
    settings, size = objective.settings, cfg.batch.batch_size
    slots = list(trainer._slots(trainer.slots_per_step))
    prompts, places = replica_prompts(draw, settings.num_generations, slots, size)
    batches = generation_batches(prompts, cfg.batch.micro_batch_size, trainer.pad_id, trainer.device)
    sampler = None
    if topo.is_last_stage:
        seed = cfg.data.seed * 1_000_003 + step * 10_007 + topo.replica
        sampler = Sampler(cfg.generation.sampling, seed, trainer.device)
    with trainer.comm.tracer.span("generate", f"step {step}"):
        in_flight = cfg.generation.in_flight_for(topo.pipeline_size)
        tokens = generate(trainer.stage, trainer.comm, batches, stops, sampler, in_flight,
                          compute_dtype(cfg.optim.precision))  # fmt: skip
    if tokens is None:
        return None
    generated = completions(tokens, stops.eos_ids)
    rows = trainer.slots_per_step * size
    input_ids, labels = training_rows(prompts, generated, places, settings.mask_truncated_completions, rows,
                                      cfg.data.seq_length, trainer.pad_id)  # fmt: skip
    advantages, total = torch.zeros(rows), None
    if topo.is_last_stage:
        made, scored, sums = rollout_sums(objective.functions, settings, prompts, generated, trainer.tokenizer)
        advantages[places] = scored
        objective.rollout = sums
        record(cfg.checkpoint.path, topo.replica, [{"step": step, **row, "policy_step": step - 1} for row in made])
        if settings.loss_type == "dapo" and not cfg.dp.steps_alone and topo.data_size > 1:
            # the step's completion tokens, over what every replica generated
            counted = torch.tensor([float(sum(objective.count(labels[trainer._rows(s)]) for s in slots))],
                                   dtype=torch.float64, device=trainer.device)  # fmt: skip
            trainer.comm.all_reduce_data(counted)
            total = counted.item()
    return RolloutBatch(input_ids, labels, (0,) * rows, advantages=advantages, total=total)
