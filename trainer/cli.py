"""Command-line flags (the established names) -> typed configs."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch

from comm.admission import TOKEN_ENV, token_from
from comm.compress import CODECS, GROUP, OUTLIERS, gradient_codec_for
from comm.devices import choose_device
from comm.process_group import CommConfig
from comm.topology import Topology
from modules.lora import LoraSpec
from trainer.config import (
    AUTO_CHUNK_MIB,
    AUTO_CHUNK_TOKENS,
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    DataParallelConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    str2bool,
)
from trainer.data import PACKING, parse_task_names
from trainer.objective import ObjectiveConfig

DEFAULT_DIST_URL = "tcp://127.0.0.1:7033"


def chunk_tokens(text: str) -> int | None:
    """``--loss-chunk-tokens``: a count, or ``auto`` (None: the trainer decides from the logits' size)."""
    return None if text == "auto" else int(text)


def layer_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or comma-separated counts, not {text!r}") from None


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
    p = argparse.ArgumentParser(
        prog="dist_clm_train.py",
        formatter_class=DefaultsShown,
        description="Pipeline- and data-parallel fine-tuning of causal LMs from layer-sharded checkpoints.",
    )
    p.add_argument("--config", default=None, help="YAML file of flags (names as on the command line, which wins)")
    m = p.add_argument_group("model")
    m.add_argument("--model-name", required=True, help="layer-sharded model directory (convert/from_hf.py output)")
    m.add_argument("--tokenizer-name", default=None, help="tokenizer directory (default: --model-name)")
    m.add_argument("--model-type", default=None, help="model family; default: detected from config.json")
    m.add_argument("--load-pretrained-model", type=str2bool, default=True, help="load weights (false: random init)")
    m.add_argument(
        "--num-layers",
        type=layer_counts,
        default=None,
        help="layers per stage: one count for all stages, or one per stage like 5,4,4,3 "
        "(default: balanced by parameter count)",
    )
    m.add_argument("--embedding-dim", type=int, default=None, help="hidden size, checked against config.json")
    m.add_argument(
        "--moe-aux-loss-coef",
        type=float,
        default=None,
        help="mixture of experts: weight of the routers' load-balancing loss (0: off; default: as config.json "
        "says, HF's rule: on with router_aux_loss_coef where output_router_logits is true)",
    )

    lo = p.add_argument_group("LoRA (base weights frozen, adapters trained, saved and synced)")
    lo.add_argument("--lora-rank", type=int, default=0, help="rank of the adapters (0: full fine-tuning)")
    lo.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha/rank (default: 2 x rank)")
    lo.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    lo.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        help="linear layers of each block to adapt, by name, e.g. q_proj v_proj (comma-separated works too; "
        "default, or all-linear: every linear layer of a block)",
    )

    d = p.add_argument_group("data")
    d.add_argument(
        "--task-name",
        required=True,
        help="path[:weight],... of .jsonl, .jsonl.zst, .csv, .parquet files or datasets folders; records hold 'text', "
        "'prompt' with 'completion'/'generation'/'response', chat 'messages', ShareGPT 'conversations', or alpaca "
        "'instruction'/'input'/'output' (conversations go through the chat template; assistant turns are trained); "
        "under --objective dpo or reward, preference pairs: 'prompt', 'chosen', 'rejected' (text or turns)",
    )
    d.add_argument("--seq-length", type=int, default=2048, help="tokens per packed sequence")
    d.add_argument("--seed", type=int, default=42, help="seed of the data stream and of random init")
    d.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed records, not stop")
    d.add_argument(
        "--packing",
        choices=PACKING,
        default=None,
        help="documents: whole examples packed, each attending only to itself, positions restarting (default for "
        "a new run); concat: tokens back to back across examples (the default before this flag; a run "
        "checkpointed then resumes with it); none: one example a sequence, padded",
    )
    d.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template for conversation records (default: the tokenizer's own chat_template)",
    )
    d.add_argument("--preview-data", type=int, default=0, metavar="N", help="print N sampled sequences and exit")
    d.add_argument(
        "--preview-format",
        choices=("json", "text"),
        default="json",
        help="--preview-data as JSON lines with input_ids and labels (default), or as text with the trained "
        "tokens marked [[like this]]",
    )
    d.add_argument("--evaluation-data", default=None, help="held-out data (any --task-name file type)")
    d.add_argument("--evaluation-steps", type=int, default=0, help="evaluate every K steps (0: after the last)")
    d.add_argument("--evaluation-num-batch", type=int, default=10, help="global batches per evaluation")

    ObjectiveConfig.add_flags(p)

    b = p.add_argument_group("batch")
    b.add_argument(
        "--batch-size", type=int, default=4, help="sequences (dpo: pairs) per data-parallel replica per step"
    )
    b.add_argument("--micro-batch-size", type=int, default=1, help="sequences (dpo: pairs) per pipeline micro-batch")
    b.add_argument("--gradient-accumulate-step", type=int, default=1, help="batches summed per optimizer step")

    o = p.add_argument_group("optimization")
    o.add_argument(
        "--optimizer",
        choices=("adamw", "adam", "8bit-adam"),
        default="adamw",
        help="adam is an alias of adamw; 8bit-adam needs bitsandbytes",
    )
    o.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    o.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps, then linear decay to 0")
    o.add_argument("--total-steps", type=int, default=1000, help="optimizer steps in the whole run")
    o.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    precision = o.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast, fp32 master weights, loss scaling")
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast, fp32 master weights")
    o.add_argument("--loss-scale-init", type=float, default=2.0**16, help="fp16: first loss scale")
    o.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=3,
        help="stop after N non-finite steps in a row (fp16: N overflows at the smallest loss scale)",
    )

    t = p.add_argument_group("distributed")
    t.add_argument("--dist-url", default=None, help=f"tcp://<rank-0 address>:<port> (default {DEFAULT_DIST_URL})")
    t.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="total ranks; must equal pp x dp (default: $WORLD_SIZE, or pp x dp)",
    )
    t.add_argument("--pipeline-group-size", type=int, default=1, help="stages per pipeline (pp)")
    t.add_argument("--data-group-size", type=int, default=1, help="replicated pipelines (dp)")
    t.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK from torchrun)")
    t.add_argument("--net-interface", default=None, help="network interface Gloo/NCCL bind to, e.g. eth0")
    t.add_argument(
        "--dist-backend",
        choices=("gloo", "nccl"),
        default=None,
        help="pipeline backend (default: nccl on CUDA, else gloo)",
    )
    t.add_argument(
        "--dp-backend",
        choices=("gloo", "nccl"),
        default=None,
        help="data-parallel backend (default: as --dist-backend's)",
    )
    DataParallelConfig.add_flags(t)
    t.add_argument(
        "--elastic",
        action="store_true",
        help="replicas may leave and come back: when a rank is lost, its whole replica leaves and the other "
        "complete pipelines go on without a restart, the global batch split over fewer replicas; its ranks "
        "started again with the same flags join the live run at a step boundary (--dp-mode allreduce; the "
        "run's store runs in a process of its own that rank 0 starts)",
    )
    t.add_argument(
        "--pp-mode",
        choices=("gpipe", "1f1b", "zb1"),
        default="gpipe",
        help="pipeline schedule; 1f1b holds activations of at most pp micro-batches per stage; zb1 (zero "
        "bubble, ZB-H1) is 1f1b with weight gradients deferred into the bubbles: about a third of its idle time",
    )
    t.add_argument(
        "--activation-checkpointing",
        choices=("none", "full"),
        default="none",
        help="full: keep only each block's input for the backward and recompute the block there "
        "(activation memory per held micro-batch falls to one hidden state per block; about 1/3 more compute)",
    )
    t.add_argument(
        "--loss-chunk-tokens",
        type=chunk_tokens,
        default=None,
        help="the loss projects this many tokens to the vocabulary at a time and keeps no logits for the "
        "backward, which projects them again (0: the whole micro-batch's logits, kept); default auto: "
        f"{AUTO_CHUNK_TOKENS} when a micro-batch's fp32 logits reach {AUTO_CHUNK_MIB} MiB, else 0",
    )
    t.add_argument(
        "--pp-compress",
        choices=CODECS,
        default="none",
        help="activations between stages: 16-bit casts, or int8/int4 with group-wise scales and each "
        "token's largest values sent exactly (robust to outlier channels)",
    )
    t.add_argument(
        "--pp-compress-grad",
        choices=CODECS,
        default=None,
        help="their gradients on the way back (int8/int4 round stochastically); default: what the "
        "link's activations use, int8 for int8/int4 activations, none for none",
    )
    t.add_argument(
        "--pp-compress-group",
        type=int,
        default=GROUP,
        help="int8/int4: channels sharing one scale (0: one scale per token)",
    )
    t.add_argument(
        "--pp-compress-outliers",
        type=int,
        default=OUTLIERS,
        help="int8/int4 activations: values of largest magnitude per token sent exactly beside the quantised "
        "rest (gradients send none: their outlier channels are not larger)",
    )
    t.add_argument(
        "--link-bandwidth-mbps",
        type=float,
        default=0.0,
        help="emulate a link: hold this rank's sends to this rate (0: off)",
    )
    t.add_argument("--link-latency-ms", type=float, default=0.0, help="emulate a link: delay per message")
    t.add_argument("--comm-timeout", type=float, default=300.0, help="seconds before a silent peer is an error")
    t.add_argument(
        "--run-token",
        default=None,
        metavar="SECRET",
        help=f"a secret every rank proves it knows (an HMAC challenge) before it may join the run; better given as "
        f"the environment variable {TOKEN_ENV}, which a process list does not show. Never written or logged; it "
        "does not encrypt the traffic (use a tunnel between sites)",
    )

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
                value = action.type(str(value)) if action.type and not isinstance(value, bool) else value
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


def data_config(args: argparse.Namespace) -> DataConfig:
    template = None
    if args.chat_template is not None:
        path = Path(args.chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"--chat-template {path}: no such file (give a Jinja chat template file)")
        template = path.read_text(encoding="utf-8")
    tasks = parse_task_names(args.task_name)
    return DataConfig(tasks, args.seq_length, args.seed, args.skip_bad_lines, template, args.packing)


def batch_config(args: argparse.Namespace, objective: ObjectiveConfig) -> BatchConfig:
    """The batch in sequences: under a pair objective the flags count pairs, two sequences each."""
    batch = BatchConfig(args.batch_size, args.micro_batch_size, args.gradient_accumulate_step)
    if not objective.pairs:
        return batch
    return replace(batch, batch_size=2 * batch.batch_size, micro_batch_size=2 * batch.micro_batch_size)


def eval_path(path: str | None) -> Path | None:
    if path is None:
        return None
    tasks = parse_task_names(path)  # checks the file now, not at the first evaluation
    if len(tasks) != 1:
        raise ValueError(f"--evaluation-data takes one file, not {len(tasks)}")
    return tasks[0].path


def lora_spec(args: argparse.Namespace) -> LoraSpec | None:
    if args.lora_rank == 0:
        given = [flag for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-target-modules",
                 args.lora_target_modules)) if value is not None]  # fmt: skip
        if given:
            raise ValueError(f"{' and '.join(given)} need --lora-rank R (> 0) to turn LoRA on")
        return None
    items = args.lora_target_modules or ()
    items = [items] if isinstance(items, str) else items  # a --config file may give one string
    targets = tuple(name for item in items for name in str(item).split(",") if name)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoraSpec(args.lora_rank, alpha, args.lora_dropout, targets)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Check the flags together and build the run's configs; raises ValueError with a hint."""
    rank = args.rank if args.rank is not None else _env_int("RANK")
    if rank is None:
        raise ValueError("no --rank given and no $RANK set; pass --rank N or launch with torchrun")
    topo = Topology(rank, args.pipeline_group_size, args.data_group_size)
    world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE")
    if world is not None and world != topo.world_size:
        raise ValueError(
            f"--world-size {world} != --pipeline-group-size {topo.pipeline_size} x "
            f"--data-group-size {topo.data_size} = {topo.world_size}; make them agree"
        )
    use_cuda = torch.cuda.is_available() if args.use_cuda is None else args.use_cuda
    device = choose_device(use_cuda, args.cuda_id, _env_int("LOCAL_RANK"), torch.cuda.device_count())
    default_backend = "nccl" if use_cuda else "gloo"
    for flag, backend in (("--dist-backend", args.dist_backend), ("--dp-backend", args.dp_backend)):
        if backend == "nccl" and not use_cuda:
            raise ValueError(f"{flag} nccl moves CUDA tensors only; add --use-cuda true or use {flag} gloo")
    dist_url = args.dist_url or ("env://" if "MASTER_ADDR" in os.environ else DEFAULT_DIST_URL)
    comm = CommConfig(
        dist_url=dist_url,
        backend=args.dist_backend or default_backend,
        dp_backend=args.dp_backend or default_backend,
        timeout_s=args.comm_timeout,
        net_interface=args.net_interface,
        pp_compress=args.pp_compress,
        pp_compress_grad=args.pp_compress_grad or gradient_codec_for(args.pp_compress),
        pp_compress_group=args.pp_compress_group,
        pp_compress_outliers=args.pp_compress_outliers,
        link_bandwidth_mbps=args.link_bandwidth_mbps,
        link_latency_ms=args.link_latency_ms,
        elastic=args.elastic,
        run_token=token_from(args.run_token),
    )
    model_type = args.model_type.replace("-", "") if args.model_type else None
    objective = ObjectiveConfig.from_args(args)
    return RunConfig(
        topology=topo,
        comm=comm,
        model=ModelConfig(
            model_name=args.model_name,
            tokenizer_name=args.tokenizer_name or args.model_name,
            model_type=model_type,
            load_pretrained=args.load_pretrained_model,
            layers_per_stage=args.num_layers,
            embedding_dim=args.embedding_dim,
            moe_aux_loss_coef=args.moe_aux_loss_coef,
        ),
        data=data_config(args),
        evaluation=EvalConfig(eval_path(args.evaluation_data), args.evaluation_steps, args.evaluation_num_batch),
        batch=batch_config(args, objective),
        optim=OptimConfig(
            lr=args.lr,
            total_steps=args.total_steps,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            optimizer=args.optimizer,
            precision="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
            loss_scale=args.loss_scale_init,
            max_nonfinite_steps=args.max_nonfinite_steps,
        ),
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
        lora=lora_spec(args),
        objective=objective,
    )
