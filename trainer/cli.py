"""Command-line flags (the established names) -> typed configs."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch

from comm.config import CommConfig
from comm.devices import choose_device
from comm.topology import Topology
from data.config import DataConfig
from generation.config import GenerationConfig
from modules.lora import LoraSpec
from objectives.config import ObjectiveConfig
from objectives.rewards import load_reward_function
from trainer.config import (
    AUTO_CHUNK_MIB,
    AUTO_CHUNK_TOKENS,
    BatchConfig,
    CheckpointConfig,
    DataParallelConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    str2bool,
)


def chunk_tokens(text: str) -> int | None:
    """``--loss-chunk-tokens``: a count, or ``auto`` (None: the trainer decides from the logits' size)."""
    return None if text == "auto" else int(text)


class DefaultsShown(argparse.HelpFormatter):
    """``--help`` states each flag's default, except where its help already explains the default
    (or there is none to state: a switch, or a value worked out at start-up)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unstated = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unstated or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    """Every config's flags in its group; the flags of the run as a whole beside them."""
    p = argparse.ArgumentParser(
        prog="dist_clm_train.py",
        formatter_class=DefaultsShown,
        description="Pipeline- and data-parallel fine-tuning of causal LMs from layer-sharded checkpoints.",
    )
    p.add_argument("--config", default=None, help="YAML file of flags (names as on the command line, which wins)")
    ModelConfig.add_flags(p.add_argument_group("model"))
    LoraSpec.add_flags(p.add_argument_group("LoRA (base weights frozen, adapters trained, saved and synced)"))
    d = p.add_argument_group("data")
    DataConfig.add_flags(d)
    d.add_argument("--preview-data", type=int, default=0, metavar="N", help="print N sampled sequences and exit")
    d.add_argument(
        "--preview-format",
        choices=("json", "text"),
        default="json",
        help="--preview-data as JSON lines with input_ids and labels (default), or as text with the trained "
        "tokens marked [[like this]]",
    )
    EvalConfig.add_flags(d)
    ObjectiveConfig.add_flags(p)
    GenerationConfig.add_flags(p)
    BatchConfig.add_flags(p.add_argument_group("batch"))
    OptimConfig.add_flags(p.add_argument_group("optimization"))

    t = p.add_argument_group("distributed")
    t.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="total ranks; must equal pp x dp (default: $WORLD_SIZE, or pp x dp)",
    )
    t.add_argument("--pipeline-group-size", type=int, default=1, help="stages per pipeline (pp)")
    t.add_argument("--data-group-size", type=int, default=1, help="replicated pipelines (dp)")
    t.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK from torchrun)")
    links = p.add_argument_group("pipeline")
    links.add_argument(
        "--pp-mode",
        choices=("gpipe", "1f1b", "zb1"),
        default="gpipe",
        help="pipeline schedule; 1f1b holds activations of at most pp micro-batches per stage; zb1 (zero "
        "bubble, ZB-H1) is 1f1b with weight gradients deferred into the bubbles: about a third of its idle time",
    )
    links.add_argument(
        "--activation-checkpointing",
        choices=("none", "full"),
        default="none",
        help="full: keep only each block's input for the backward and recompute the block there "
        "(activation memory per held micro-batch falls to one hidden state per block; about 1/3 more compute)",
    )
    links.add_argument(
        "--loss-chunk-tokens",
        type=chunk_tokens,
        default=None,
        help="the loss projects this many tokens to the vocabulary at a time and keeps no logits for the "
        "backward, which projects them again (0: the whole micro-batch's logits, kept); default auto: "
        f"{AUTO_CHUNK_TOKENS} when a micro-batch's fp32 logits reach {AUTO_CHUNK_MIB} MiB, else 0",
    )
    CommConfig.add_flags(t, links)  # how ranks connect; what travels between stages
    DataParallelConfig.add_flags(p.add_argument_group("data parallel"))

    h = p.add_argument_group("device")
    h.add_argument("--use-cuda", type=str2bool, default=None, help="train on CUDA (default: if available)")
    h.add_argument(
        "--cuda-id",
        type=int,
        default=None,
        help="CUDA device index on this node (default: $LOCAL_RANK under torchrun, else 0)",
    )

    c = p.add_argument_group("checkpoints and logs")
    CheckpointConfig.add_flags(c)
    c.add_argument(
        "--profiling",
        choices=("no-profiling", "tidy_profiling", "pytorch_profiling"),
        default="no-profiling",
        help="tidy_profiling: per-rank and merged Chrome traces, summary and timeline in <checkpoint-path>/trace; "
        "pytorch_profiling: torch.profiler traces of steps 3-5",
    )
    c.add_argument("--log-interval", type=int, default=10, help="log a line every N steps (metrics: every step)")
    c.add_argument("--train-log-backend", choices=("print", "wandb"), default="print", help="where metrics go "
                   "besides metrics.jsonl; wandb honours WANDB_* variables (WANDB_MODE=offline works)")  # fmt: skip
    c.add_argument("--project-name", default="dist-clm-train", help="wandb project")
    c.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags from the command line over those of ``--config <yaml>`` (a mapping of flag names)."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    for flag in ("--fp16", "--bf16"):
        pre.add_argument(flag, action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        import yaml

        try:
            with open(known.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            parser.error(f"--config {known.config}: {str(err).splitlines()[0]}")
        if not isinstance(values, dict):
            parser.error(f"--config {known.config}: expected a mapping of flag names to values")
        actions = {a.dest: a for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = str(key).lstrip("-").replace("-", "_")
            if dest not in actions or dest in ("help", "config"):
                parser.error(f"--config {known.config}: unknown flag {key!r}")
            action = actions[dest]
            try:
                if isinstance(value, list):  # a flag of several values (--reward-funcs a b)
                    value = [action.type(str(v)) if action.type else v for v in value]
                elif action.type and not isinstance(value, bool):
                    value = action.type(str(value))
            except (ValueError, argparse.ArgumentTypeError) as err:
                parser.error(f"--config {known.config}: {key}: {err}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"--config {known.config}: {key} {value!r} is not one of {list(action.choices)}")
            defaults[dest] = value
            action.required = False  # given by the file; the command line may still override it
        if known.fp16 or known.bf16:  # the command line's precision replaces the file's: they exclude each other
            for dest in ("fp16", "bf16"):
                defaults.pop(dest, None)
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value is not None and value.isdigit() else None


def _grpo_checked(
    objective: ObjectiveConfig, generation: GenerationConfig, args: argparse.Namespace
) -> ObjectiveConfig:
    """GRPO's flags against the batch's and the sampling's; its completions are scored at the
    sampling's temperature and dr_grpo divides by its length."""
    settings = objective.grpo
    if args.batch_size % settings.num_generations:
        raise ValueError(
            f"--batch-size {args.batch_size} is not a multiple of --num-generations {settings.num_generations}: "
            "under --objective grpo it counts completions, and a slot holds whole groups"
        )
    if generation.sampling.greedy:
        raise ValueError("--objective grpo samples: at --temperature 0 every completion of a group would be the same")
    if generation.sampling_only:
        raise ValueError("--sample-prompts samples a model and trains nothing: drop --objective grpo")
    if args.evaluation_data:
        raise ValueError("--objective grpo does not evaluate held-out data yet: drop --evaluation-data")
    if args.task_name and "," in args.task_name:
        raise ValueError("--objective grpo reads one prompts file: give --task-name a single jsonl")
    if args.elastic or args.spares:
        raise ValueError("--objective grpo does not regroup replicas yet: drop --elastic and --spares")
    for spec in settings.reward_funcs:  # a missing module or function: one line now, before any rank waits
        load_reward_function(spec)
    if settings.scale_rewards == "batch" and args.data_group_size > 1:
        raise ValueError("--scale-rewards batch over several replicas is not supported yet: use group or none")
    sampling = generation.sampling
    return replace(objective, grpo=replace(settings, temperature=sampling.temperature,
                                           max_completion_length=sampling.max_completion_length))  # fmt: skip


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Check the flags together and build the run's configs; raises ValueError with a hint."""
    rank = args.rank if args.rank is not None else _env_int("RANK")
    if rank is None:
        raise ValueError("no --rank given and no $RANK set; pass --rank N or launch with torchrun")
    slots = Topology(0, args.pipeline_group_size, args.data_group_size).world_size
    spare_rank = None
    if slots <= rank < slots + args.spares:  # a spare: it takes a place only when a rank is lost
        spare_rank, rank = rank, 0
    elif rank >= slots and args.spares:
        raise ValueError(f"--rank {rank} is outside 0..{slots + args.spares - 1} ({slots} ranks, then --spares "
                         f"{args.spares} from rank {slots})")  # fmt: skip
    topo = Topology(rank, args.pipeline_group_size, args.data_group_size)
    # --world-size counts the pipelines' ranks; torchrun's $WORLD_SIZE counts every process it starts
    if args.world_size is not None and args.world_size != slots:
        raise ValueError(
            f"--world-size {args.world_size} != --pipeline-group-size {topo.pipeline_size} x "
            f"--data-group-size {topo.data_size} = {slots}; make them agree (spares are not counted)"
        )
    world = _env_int("WORLD_SIZE") if args.world_size is None else None
    if world is not None and world != slots + args.spares:
        raise ValueError(
            f"$WORLD_SIZE {world} != --pipeline-group-size {topo.pipeline_size} x --data-group-size "
            f"{topo.data_size} + --spares {args.spares} = {slots + args.spares}; make them agree (torchrun's "
            "--nproc-per-node x nodes counts the spares too)"
        )
    use_cuda = torch.cuda.is_available() if args.use_cuda is None else args.use_cuda
    device = choose_device(use_cuda, args.cuda_id, _env_int("LOCAL_RANK"), torch.cuda.device_count())
    objective = ObjectiveConfig.from_args(args)
    generation = GenerationConfig.from_args(args)
    if objective.name == "grpo":
        objective = _grpo_checked(objective, generation, args)
    return RunConfig(
        topology=topo,
        comm=CommConfig.from_args(args, use_cuda),
        model=ModelConfig.from_args(args),
        data=DataConfig.from_args(args),
        evaluation=EvalConfig.from_args(args),
        batch=BatchConfig.from_args(args, objective.pairs),
        optim=OptimConfig.from_args(args),
        checkpoint=CheckpointConfig.from_args(args),
        device=device,
        log_level=args.log_level,
        log_interval=args.log_interval,
        pp_mode=args.pp_mode,
        activation_checkpointing=args.activation_checkpointing,
        loss_chunk_tokens=args.loss_chunk_tokens,
        dp=DataParallelConfig.from_args(args),
        profiling=args.profiling,
        log_backend=args.train_log_backend,
        project_name=args.project_name,
        lora=LoraSpec.from_args(args),
        objective=objective,
        generation=generation,
        spare_rank=spare_rank,
    )
