"""Before the first step: plan this rank's stage, then agree with every rank on a healthy start."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace

import torch

from comm.process_group import Communicator
from modules import Family, family_for, is_classifier, load_config
from modules.routing import with_router_loss
from pipeline.partition import PartWeights, split_layers
from trainer.config import RunConfig
from trainer.memory import device_memory_bytes
from trainer.precision import compute_dtype


class StartupError(RuntimeError):
    """A rank could not start; raised on every rank so none waits for it."""


@dataclass
class Plan:
    """What this rank computes, derived from the configs and the model's config.json."""

    family: Family
    model_config: object
    layers: range

    @property
    def tied(self) -> bool:
        return bool(getattr(self.model_config, "tie_word_embeddings", False))


def plan_stage(cfg: RunConfig) -> Plan:
    """Checks that need only the flags and config.json (identical on every rank: run before
    connecting), and this rank's layers split by compute alone (``place_stage`` adds memory)."""
    model_config = load_config(cfg.model.model_name, cfg.model.model_type)
    family = family_for(model_config.model_type)
    if is_classifier(model_config) and not cfg.objective.reward_model:
        raise ValueError(
            f"{cfg.model.model_name} is a reward model (a sequence classifier: a score head, no output layer to "
            f"predict tokens with); train it with --objective reward, or --objective {cfg.objective.name} from a "
            "causal LM"
        )
    if cfg.model.moe_aux_loss_coef is not None and family.router is None:
        raise ValueError(f"--moe-aux-loss-coef: {family.name} models have no experts to balance; drop the flag")
    model_config = with_router_loss(model_config, cfg.model.moe_aux_loss_coef)
    if cfg.model.embedding_dim is not None and cfg.model.embedding_dim != model_config.hidden_size:
        raise ValueError(
            f"--embedding-dim {cfg.model.embedding_dim} != hidden size {model_config.hidden_size} in config.json; "
            "drop the flag or fix it"
        )
    limit = model_config.max_position_embeddings
    if family.learned_positions and cfg.data.seq_length > limit:
        raise ValueError(
            f"--seq-length {cfg.data.seq_length} is longer than the {limit} positions this {family.name} model "
            f"learned; use --seq-length {limit} or less"
        )
    return place_stage(cfg, Plan(family, model_config, range(0)), None)


def place_stage(cfg: RunConfig, plan: Plan, stage_memory: list[float] | None) -> Plan:
    """``plan`` with this rank's layers: the split by compute, within ``stage_memory`` (bytes
    each stage may hold, from ``stage_memory_limits``) when it is known."""
    compute, memory = stage_costs(cfg, plan.family, plan.model_config)
    split = split_layers(
        plan.model_config.num_hidden_layers,
        cfg.topology.pipeline_size,
        cfg.model.layers_per_stage,
        cost=compute,
        memory=memory,
        limits=stage_memory,
    )
    return replace(plan, layers=split[cfg.topology.stage])


def part_sizes(family: Family, model_config: object) -> tuple[int, int, int]:
    """Parameter counts of the embedding, one layer and the head, without allocating them."""
    with torch.device("meta"):
        parts = (family.embedding(model_config), family.block(model_config, 0), family.head(model_config))
    return tuple(sum(p.numel() for p in part.parameters()) for part in parts)


# Saved activation values per token of one block, in units of the hidden size (plus one score
# per head and key): measured with trainer.memory.probe_micro_batch on the four families in
# fp32, 17 (GPT-NeoX), 18 (LLaMA), 26 (GPT-J), 28 (GPT-2). A coarse bound for choosing a split;
# the start-up estimate probes the real stage afterwards.
BLOCK_ACTIVATIONS_PER_HIDDEN = 28


def stage_costs(cfg: RunConfig, family: Family, model_config: object) -> tuple[PartWeights, list[PartWeights]]:
    """What the embedding, a layer and the head cost: forward + backward FLOPs per token, and
    each stage's bytes (weights, gradients, AdamW state, held activations).

    A linear layer of P weights costs 2P FLOPs forward, 2P for its input gradient and 2P for
    its weight gradient (none when frozen under LoRA); recomputation adds a forward, and the
    chunked loss projects to the vocabulary again in the backward. Attention adds 2 x 2 x seq x
    hidden per token forward, twice that backward. The embedding is a lookup: free."""
    embedding, layer, head = part_sizes(family, model_config)
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    vocab, seq, p = model_config.vocab_size, cfg.data.seq_length, cfg.topology.pipeline_size
    trained, recompute = cfg.lora is None, cfg.activation_checkpointing == "full"
    chunked = cfg.chunk_tokens_for(vocab) > 0
    linear = 6 if trained else 4
    attention = 12 * seq * hidden
    compute = PartWeights(
        embedding=0.0,
        layer=(linear + 2 * recompute) * layer + attention * (4 / 3 if recompute else 1),
        head=(linear + 2 * chunked) * head,
    )
    # bytes per parameter: fp32 weights, and if trained its gradient and AdamW's two moments
    # (and under DiLoCo the outer anchor and momentum)
    sharing = cfg.dp.optimizer_shards(cfg.topology.data_size)
    outer = cfg.dp.own_bytes_per_value
    per_param = 4 + (4 + 8 / sharing + outer if trained else 0)
    tokens = cfg.batch.micro_batch_size * seq
    value = 2 if compute_dtype(cfg.optim.precision) is not None else 4  # a saved activation under autocast
    block_act = tokens * (4 * hidden if recompute else value * (BLOCK_ACTIVATIONS_PER_HIDDEN * hidden + heads * seq))
    head_act = tokens * (4 * hidden if chunked else 2 * 4 * vocab)  # chunked: the norm's output; else logits twice
    memory = []
    for stage in range(p):
        held = cfg.held_micro_batches(stage)
        memory.append(
            PartWeights(
                embedding=per_param * embedding + held * tokens * 4 * hidden,
                layer=per_param * layer + held * block_act,
                head=per_param * head + held * head_act,
            )
        )
    return compute, memory


def stage_memory_limits(comm: Communicator, device: torch.device) -> list[float]:
    """Bytes each stage may hold: the least its ranks have. A GPU's memory is its own; a host's
    memory is shared by its ranks on the CPU. Every rank gets the same list (one gather)."""
    own = (socket.gethostname(), str(device), device_memory_bytes(device))
    ranks = comm.all_gather_object(own)
    topo = comm.topo
    limits = [float("inf")] * topo.pipeline_size
    for rank, (host, name, total) in enumerate(ranks):
        sharing = sum(1 for h, n, _ in ranks if (h, n) == (host, name))
        stage = rank % topo.pipeline_size
        limits[stage] = min(limits[stage], total / sharing)
    return limits


def agree_on_start(comm: Communicator, cfg: RunConfig, step: int, error: str | None) -> list[str]:
    """Every rank shares its status; any failure or mismatch stops all ranks with its reason.

    Returns the host name of every rank.
    """
    status = {"error": error, "fingerprint": cfg.fingerprint(), "step": step, "host": socket.gethostname()}
    statuses = comm.all_gather_object(status)
    _raise_problems(cfg, statuses)
    return [s["host"] for s in statuses]


def _raise_problems(cfg: RunConfig, statuses: list[dict]) -> None:
    topo = cfg.topology
    problems = [f"{topo.describe(r)}: {s['error']}" for r, s in enumerate(statuses) if s["error"]]
    if not problems:
        odd = [r for r, s in enumerate(statuses) if s["fingerprint"] != statuses[0]["fingerprint"]]
        if odd:
            problems.append(
                f"ranks {odd} were started with other training flags than rank 0; launch every rank with the same flags"
            )
        steps = sorted({s["step"] for s in statuses})
        if len(steps) > 1:
            problems.append(f"ranks resume from different steps {steps}; give every rank the same checkpoint files")
    if problems:
        raise StartupError("cannot start: " + "; ".join(problems))


def set_threads(hosts: list[str]) -> int:
    """One thread per core this rank may use: cores divided among the ranks on this host."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()  # the user decided
    local_ranks = max(1, hosts.count(socket.gethostname()))
    threads = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    torch.set_num_threads(threads)
    return threads
