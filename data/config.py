"""The data flags' config: what the stream reads and how it cuts examples into sequences."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from data.pairs import TRUNCATION
from data.stream import PACKING, TaskSpec, parse_task_names


@dataclass(frozen=True)
class DataConfig:
    tasks: tuple[TaskSpec, ...]
    seq_length: int
    seed: int = 42
    skip_bad_lines: bool = False
    chat_template: str | None = None  # --chat-template's text (None: the tokenizer's own)
    packing: str | None = None  # --packing; None: documents, or what a resumed stream recorded
    truncation: str | None = None  # --truncation-mode, preference pairs only; None: keep_end

    @property
    def pair_truncation(self) -> str:
        return self.truncation or "keep_end"

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError("--seq-length must be at least 2 (a token and the one it predicts)")

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--task-name",
            default=None,
            help="path[:weight],... of .jsonl, .jsonl.zst, .csv, .parquet files or datasets folders; records hold "
            "'text', 'prompt' with 'completion'/'generation'/'response', chat 'messages', ShareGPT 'conversations', "
            "or alpaca 'instruction'/'input'/'output' (conversations go through the chat template; assistant turns "
            "are trained); under --objective dpo or reward, preference pairs: 'prompt', 'chosen', 'rejected' (text "
            "or turns)",
        )
        group.add_argument("--seq-length", type=int, default=2048, help="tokens per packed sequence")
        group.add_argument("--seed", type=int, default=42, help="seed of the data stream and of random init")
        group.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed records, not stop")
        group.add_argument(
            "--packing",
            choices=PACKING,
            default=None,
            help="documents: whole examples packed, each attending only to itself, positions restarting (default "
            "for a new run); concat: tokens back to back across examples (the default before this flag; a run "
            "checkpointed then resumes with it); none: one example a sequence, padded",
        )
        group.add_argument(
            "--truncation-mode",
            choices=TRUNCATION,
            default=None,
            help="preference pairs longer than --seq-length: keep_end drops the start of the prompt, keeping at "
            "least half the length, then cuts the responses' ends (default); keep_start keeps each sequence's start, "
            "cutting the responses, and drops pairs whose prompt fills the length (TRL's default)",
        )
        group.add_argument(
            "--chat-template",
            default=None,
            metavar="FILE",
            help="Jinja chat template for conversation records (default: the tokenizer's own chat_template)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataConfig:
        template = None
        if args.chat_template is not None:
            path = Path(args.chat_template)
            if not path.is_file():
                raise FileNotFoundError(f"--chat-template {path}: no such file (give a Jinja chat template file)")
            template = path.read_text(encoding="utf-8")
        if args.task_name is None and getattr(args, "sample_prompts", None) is None:
            raise ValueError("--task-name is required: the data to train on (or --sample-prompts FILE to only sample)")
        tasks = parse_task_names(args.task_name) if args.task_name is not None else ()
        return cls(tasks, args.seq_length, args.seed, args.skip_bad_lines, template, args.packing, args.truncation_mode)
