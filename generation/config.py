"""Generation's flags: how tokens are sampled, and a run that only samples a model
(``--sample-prompts``: prompts file in, jsonl of completions out, no training)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from generation.sampling import SamplingConfig


@dataclass(frozen=True)
class GenerationConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: Path | None = None  # --sample-prompts: this run samples, and trains nothing
    output: Path | None = None  # --sample-output
    in_flight: int = 0  # --decode-micro-batches: micro-batches decoding at once per pipeline (0: its stages)

    @property
    def sampling_only(self) -> bool:
        return self.prompts is not None

    def in_flight_for(self, stages: int) -> int:
        """Micro-batches in flight: one per stage keeps every stage busy on fast links; over slow
        ones each stage idles while a token travels unless more are."""
        return self.in_flight or stages

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("generation")
        g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy")
        g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only (0: all)")
        g.add_argument("--top-p", type=float, default=1.0,
                       help="sample among the likeliest tokens whose probabilities add up to p (1: all)")  # fmt: skip
        g.add_argument("--max-completion-length", type=int, default=256, help="new tokens per completion, at most")
        g.add_argument(
            "--sample-prompts", default=None, metavar="FILE",
            help="only sample the model (--model-name, with the latest checkpoint of --checkpoint-path when "
            "--load-checkpoint): FILE is jsonl with a 'prompt' per line (a string, or chat messages through the "
            "chat template); --micro-batch-size prompts go through the pipeline together; no --task-name needed",
        )  # fmt: skip
        g.add_argument(
            "--sample-output",
            default=None,
            metavar="FILE",
            help="where --sample-prompts writes its completions, one JSON line per prompt (a new file)",
        )
        g.add_argument(
            "--decode-micro-batches", type=int, default=0, metavar="M",
            help="micro-batches of prompts each pipeline decodes at once (0: one per stage); over links slower "
            "than a stage's pass, more keep the stages busy while tokens travel",
        )  # fmt: skip

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerationConfig:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.max_completion_length)
        prompts = Path(args.sample_prompts) if args.sample_prompts else None
        output = Path(args.sample_output) if args.sample_output else None
        if prompts is None and output is not None:
            raise ValueError("--sample-output is where --sample-prompts writes: add --sample-prompts FILE or drop it")
        if prompts is not None:
            if output is None:
                raise ValueError("--sample-prompts needs --sample-output FILE: where the completions go")
            if output.exists():
                raise ValueError(f"--sample-output {output} exists; choose a new file (nothing was overwritten)")
        if args.decode_micro_batches < 0:
            raise ValueError(
                f"--decode-micro-batches must be 0 (one per stage) or more, not {args.decode_micro_batches}"
            )
        return cls(sampling, prompts, output, args.decode_micro_batches)
