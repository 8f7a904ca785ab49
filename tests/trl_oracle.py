"""TRL's own trainers on the records our runs train on: the oracle of tests/test_trl_oracle.py.

Each function trains HF's model in this process with one of TRL's trainers (DPOTrainer,
CPOTrainer with the SimPO loss, RewardTrainer, SFTTrainer) set up as the pipeline runs are:
the records in file order (``train_sampling_strategy="sequential"``), the same number per step,
AdamW with the same rate, linear warm-up and decay, clipping at 1.0, no weight decay unless
asked, fp32 on the CPU. It returns TRL's own log rows (``state.log_history``: one a step, and
the evaluation's) and the final weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.helpers import LR, SEED, STEPS, WARMUP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrlRun:
    steps: list[dict]  # each training step's row, TRL's names
    evaluation: dict  # the evaluation's row after the last step (eval_ names), or {}
    weights: dict[str, torch.Tensor]  # the final state dict (PEFT models: the adapters, as PEFT saves them)


def records(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def common_args(
    out: Path, per_step: int, weight_decay: float = 0.0, steps: int = STEPS, lr: float = LR, warmup: int = WARMUP
) -> dict:
    """TrainingArguments' fields every oracle run shares (as the pipeline runs' flags say)."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": per_step,
        "per_device_eval_batch_size": per_step,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": warmup,
        "max_grad_norm": 1.0,
        "weight_decay": weight_decay,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "optim": "adamw_torch",
        "train_sampling_strategy": "sequential",  # file order, as one task's stream
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "seed": SEED,
        "data_seed": SEED,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def _finish(trainer: object, evaluate: bool) -> TrlRun:
    trainer.train()
    history = trainer.state.log_history
    steps = [row for row in history if "loss" in row and "eval_loss" not in row]
    evaluation = trainer.evaluate() if evaluate else {}
    model = trainer.model
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(model)
    else:
        weights = model.state_dict()
    return TrlRun(steps, evaluation, {k: v.detach().clone() for k, v in weights.items()})


def dpo(
    model: torch.nn.Module, hf: Path, train: str, valid: str | None, out: Path, per_step: int, beta: float,
    reference: str, max_length: int, **schedule: float,
) -> TrlRun:  # fmt: skip
    """TRL's DPOTrainer: ``reference`` "precomputed" (one pass before training) or "live" (each
    step's forward of a frozen copy; PEFT models: the adapters off). ``schedule``: other steps,
    lr or warmup than the tiny tier's."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    precomputed = reference == "precomputed"
    args = DPOConfig(**common_args(out, per_step, **schedule), beta=beta, loss_type=["sigmoid"], max_length=max_length,
                     precompute_ref_log_probs=precomputed, precompute_ref_batch_size=per_step)  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, processing_class=AutoTokenizer.from_pretrained(hf),
        train_dataset=Dataset.from_list(records(train)),
        eval_dataset=Dataset.from_list(records(valid)[: 5 * per_step]) if valid else None,
    )  # fmt: skip
    return _finish(trainer, valid is not None)


def simpo(model: torch.nn.Module, hf: Path, train: str, out: Path, per_step: int, beta: float, gamma: float,
          max_length: int) -> TrlRun:  # fmt: skip
    """TRL's CPOTrainer with the SimPO loss and no behaviour-cloning term (cpo_alpha 0): SimPO.

    Its older tokenisation puts the tokenizer's ``bos_token`` before every prompt whether or not
    the tokenizer's own call puts it there (TRL's DPOTrainer and the pipeline follow the call);
    the tiny tokenizer names EOS as its BOS but never adds it, so the copy given to CPO names none."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # it asks for one, as the pipeline pads with EOS
    if tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id:
        tokenizer.bos_token = None
    args = CPOConfig(**common_args(out, per_step), beta=beta, loss_type="simpo", simpo_gamma=gamma, cpo_alpha=0.0,
                     max_length=max_length)  # fmt: skip
    trainer = CPOTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(records(train)))  # fmt: skip
    return _finish(trainer, False)


def reward(model: torch.nn.Module, hf: Path, train: str, valid: str, out: Path, per_step: int,
           max_length: int) -> TrlRun:  # fmt: skip
    """TRL's RewardTrainer on the pairs (a sequence classifier of one label)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**common_args(out, per_step), max_length=max_length)
    trainer = RewardTrainer(
        model=model, args=args, processing_class=AutoTokenizer.from_pretrained(hf),
        train_dataset=Dataset.from_list(records(train)),
        eval_dataset=Dataset.from_list(records(valid)[: 5 * per_step]),
    )  # fmt: skip
    return _finish(trainer, True)


def sft(model: torch.nn.Module, hf: Path, train: str, out: Path, per_step: int, max_length: int,
        weight_decay: float, chat_template: str) -> TrlRun:  # fmt: skip
    """TRL's SFTTrainer on conversations, the loss on the assistant's tokens only."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    tokenizer.chat_template = chat_template
    args = SFTConfig(**common_args(out, per_step, weight_decay), max_length=max_length, assistant_only_loss=True,
                     packing=False)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(records(train)))  # fmt: skip
    return _finish(trainer, False)


def grpo(
    model: torch.nn.Module, hf: Path, prompts: str, rollouts: list[dict], out: Path, per_step: int, generations: int,
    reward_funcs: list, steps: int, max_completion_length: int, **settings: object,
) -> TrlRun:  # fmt: skip
    """TRL's GRPOTrainer trained on our run's completions: its ``rollout_func`` hands each step
    the prompts' tokens and the completions our pipeline generated for that step (rollouts.jsonl,
    in our order: a prompt's group together), so both train on the same completions; the reward
    functions score them again. ``settings``: GRPOConfig's loss fields (loss_type, epsilon, ...)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    by_step: dict[int, list[dict]] = {}
    for row in rollouts:
        by_step.setdefault(row["step"], []).append(row)

    def replay(batch_prompts: list, trainer: object) -> dict:
        rows = by_step[trainer.state.global_step + 1]
        assert len(rows) == len(batch_prompts)
        return {"prompt_ids": [tokenizer(r["prompt"])["input_ids"] for r in rows],
                "completion_ids": [r["completion_ids"] for r in rows],
                "logprobs": [[0.0] * len(r["completion_ids"]) for r in rows]}  # fmt: skip

    args = GRPOConfig(**common_args(out, per_step, steps=steps, warmup=0), num_generations=generations,
                      max_completion_length=max_completion_length, beta=0.0, temperature=1.0, **settings)  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(records(prompts)), rollout_func=replay)  # fmt: skip
    return _finish(trainer, False)
