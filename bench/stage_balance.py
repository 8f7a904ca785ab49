"""Measured stage times of the old split (balanced by parameters) against the new one (by compute).

    python bench/stage_balance.py [--repeats 20] [--warmup 3] [--seq-length 128]

A GPT-NeoX whose head is heavy (vocabulary 50k, hidden 256, 8 layers, random weights) is split
over pp = 2 and pp = 4 stages twice: "parameters", ``split_layers`` with the parameter counts
of ``part_sizes`` as cost (the old default), and "compute", the split ``plan_stage`` now chooses
(``stage_costs``'s forward + backward FLOPs). Every stage of every split is built in this one
process, pinned to one thread (a rank's share of a core), and timed on one training
micro-batch as the trainer runs it: the forward (token ids on the first stage, a (1, seq,
hidden) fp32 hidden state with requires_grad on the others), the loss on the last stage, then
the backward. Each table gives the layers, the median ms and the cost model's predicted share
of every stage; the slowest stage paces a pipeline, so heaviest(compute) / heaviest(parameters)
is the expected step-time ratio. A least-squares fit of the measured times then gives what the
embedding, one layer and the head (with the loss) cost in ms, to check the cost model's weights.

Timings are noisy on a shared machine: the stages are timed round-robin, so a slow spell hits
every stage alike, and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from convert.tiny_model import tiny_config  # noqa: E402
from modules import Family, family_for  # noqa: E402
from objectives.loss import chunked_token_loss, token_loss  # noqa: E402
from pipeline.partition import PartWeights, split_layers  # noqa: E402
from pipeline.stage import Stage  # noqa: E402
from trainer.cli import build_parser, config_from_args  # noqa: E402
from trainer.config import RunConfig  # noqa: E402
from trainer.startup import part_sizes, stage_costs  # noqa: E402

log = logging.getLogger("bench.stage_balance")

VOCAB, LAYERS, HIDDEN, HEADS = 50_000, 8, 256, 8
STAGE_COUNTS = (2, 4)
SEED = 0
SHARE_TOLERANCE = 0.15  # a stage whose measured share is off its predicted share by more than this is flagged


def run_config(pp: int, seq_length: int) -> RunConfig:
    """Rank 0's config of a pp-stage run, built from flags exactly as trainer/cli.py does, so
    stage_costs sees the defaults a real run would (fp32, no LoRA, no recompute, auto loss chunk)."""
    flags = ["--rank", "0", "--world-size", str(pp), "--pipeline-group-size", str(pp),
             "--seq-length", str(seq_length), "--task-name", str(ROOT / "example_scripts" / "data" / "tiny.jsonl"),
             "--model-name", "bench-stage-balance", "--micro-batch-size", "1", "--batch-size", "8"]  # fmt: skip
    return config_from_args(build_parser().parse_args(flags))


def splits(cfg: RunConfig, family: Family, config: object) -> tuple[dict[str, list[range]], PartWeights]:
    """The old and the new split, and the compute cost model that predicts stage times."""
    n, pp = config.num_hidden_layers, cfg.topology.pipeline_size
    compute, _ = stage_costs(cfg, family, config)
    by_parameters = split_layers(n, pp, cost=PartWeights(*part_sizes(family, config)))
    # plan_stage also bounds each stage's memory by the host's; a 50k x 256 model fits any host,
    # so the split it picks is the compute-only one.
    by_compute = split_layers(n, pp, cfg.model.layers_per_stage, cost=compute)
    return {"parameters": by_parameters, "compute": by_compute}, compute


@dataclass
class StagePass:
    """One stage of one split and the inputs of its micro-batch."""

    split: str
    index: int
    layers: range
    stage: Stage
    inputs: torch.Tensor  # token ids (first stage) or the incoming hidden state
    labels: torch.Tensor | None  # last stage only
    grad: torch.Tensor | None  # the gradient the next stage would send back (not on the last stage)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def run(self) -> float:
        """Seconds for forward (+ loss) + backward, as pipeline.schedule._Runner runs them."""
        x = self.inputs
        if x.is_floating_point():
            # a fresh leaf each time, as a received activation is: its grad must not accumulate
            x = x.detach().requires_grad_(True)
        start = time.perf_counter()
        y = self.stage(x)
        if self.labels is not None:
            y = self.loss_fn(y, self.labels)
        torch.autograd.backward(y, grad_tensors=self.grad)
        return time.perf_counter() - start


def build_passes(
    name: str, split: list[range], cfg: RunConfig, family: Family, config: object, loss_chunk: int
) -> list[StagePass]:
    seq, pp = cfg.data.seq_length, cfg.topology.pipeline_size
    shape = (cfg.batch.micro_batch_size, seq, config.hidden_size)
    # the trainer divides by the global batch's trained tokens; the value does not change the time
    normalizer = float(cfg.global_batch_sequences * (seq - 1))
    gen = torch.Generator().manual_seed(SEED)
    passes = []
    for s, layers in enumerate(split):
        first, last = s == 0, s == pp - 1
        stage = Stage(family, config, layers, first, last)
        stage.init_parts(config.initializer_range, SEED)
        stage.project_logits = loss_chunk == 0  # as the trainer: the chunked loss gets the normed hidden state
        stage.train()
        head = stage.head

        def loss_fn(out: torch.Tensor, labels: torch.Tensor, head=head) -> torch.Tensor:
            # objectives/lm.py's TokenLoss: the chunked loss where cfg.chunk_tokens_for turns it on
            if loss_chunk:
                return chunked_token_loss(out, head.output, labels, normalizer, loss_chunk, head.softcap)
            return token_loss(out, labels, normalizer)

        if first:
            inputs = torch.randint(config.vocab_size, shape[:2], generator=gen)
        else:
            inputs = torch.randn(shape, generator=gen)
        labels = torch.randint(config.vocab_size, shape[:2], generator=gen) if last else None
        grad = None if last else torch.randn(shape, generator=gen) * 1e-3
        passes.append(StagePass(name, s, layers, stage, inputs, labels, grad, loss_fn))
    return passes


def time_passes(passes: list[StagePass], repeats: int, warmup: int) -> list[float]:
    """Median ms per pass. Round-robin over all passes, so other work on the machine slows every
    stage alike instead of whichever stage happened to run then. Parameter gradients accumulate
    across repeats, as they do across a step's micro-batches (the optimizer zeroes them in place)."""
    samples: list[list[float]] = [[] for _ in passes]
    for rep in range(warmup + repeats):
        for i, p in enumerate(passes):
            seconds = p.run()
            if rep >= warmup:
                samples[i].append(seconds * 1e3)
    return [statistics.median(s) for s in samples]


def fit_parts(passes: list[StagePass], ms: list[float]) -> tuple[float, float, float]:
    """ms of the embedding, one layer and the head (with the loss), by least squares over the
    measured stages of both splits: ms = layers * layer + first * embedding + last * head."""
    pp = max(p.index for p in passes) + 1
    a = torch.tensor([[float(p.index == 0), float(len(p.layers)), float(p.index == pp - 1)] for p in passes],
                     dtype=torch.float64)  # fmt: skip
    b = torch.tensor(ms, dtype=torch.float64).unsqueeze(1)
    embedding, layer, head = torch.linalg.lstsq(a, b).solution.squeeze(1).tolist()
    return embedding, layer, head


def report(pp: int, passes: list[StagePass], ms: list[float], compute: PartWeights) -> None:
    log.info("")
    log.info("pp=%d  (median of the repeats; predicted = the stage's share of stage_costs' FLOPs)", pp)
    log.info("%-10s %-14s %-34s %9s  %-22s %-22s", "split", "layers", "ms per stage", "heaviest", "measured share",
             "predicted share")  # fmt: skip
    heaviest: dict[str, float] = {}
    flagged = []
    for name in ("parameters", "compute"):
        rows = [(p, t) for p, t in zip(passes, ms, strict=True) if p.split == name]
        total_ms = sum(t for _, t in rows)
        costs = [compute.of_stage(p.index, pp, len(p.layers)) for p, _ in rows]
        measured = [t / total_ms for _, t in rows]
        predicted = [c / sum(costs) for c in costs]
        heaviest[name] = max(t for _, t in rows)
        log.info("%-10s %-14s %-34s %9.1f  %-22s %-22s", name, ",".join(str(len(p.layers)) for p, _ in rows),
                 " ".join(f"{t:7.1f}" for _, t in rows), heaviest[name], " ".join(f"{v:.2f}" for v in measured),
                 " ".join(f"{v:.2f}" for v in predicted))  # fmt: skip
        for (p, _), m, c in zip(rows, measured, predicted, strict=True):
            if abs(m / c - 1) > SHARE_TOLERANCE:
                flagged.append(f"{name} stage {p.index} ({len(p.layers)} layers): measured share {m:.2f} "
                               f"vs predicted {c:.2f} ({m / c - 1:+.0%})")  # fmt: skip
    speedup = heaviest["compute"] / heaviest["parameters"]
    by_params = [p for p in passes if p.split == "parameters"]
    by_compute = [p for p in passes if p.split == "compute"]

    def predicted_heaviest(stages: list[StagePass]) -> float:
        return max(compute.of_stage(p.index, pp, len(p.layers)) for p in stages)

    log.info("heaviest(compute split) / heaviest(parameter split): measured %.3f, predicted %.3f", speedup,
             predicted_heaviest(by_compute) / predicted_heaviest(by_params))  # fmt: skip
    for line in flagged:
        log.info("  off by more than %.0f%%: %s", SHARE_TOLERANCE * 100, line)
    if [p.layers for p in by_params] == [p.layers for p in by_compute]:
        log.info("  (both splits are the same)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per stage (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per stage first (allocator, caches)")
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per sequence (micro-batch of one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # one rank per core is how the pipeline benchmarks run; one thread also keeps the numbers
    # comparable between stages (no stage gets more cores than another)
    torch.set_num_threads(1)
    config = tiny_config("gptneox", VOCAB, num_layers=LAYERS, hidden=HIDDEN, heads=HEADS)
    config._attn_implementation = "sdpa"  # as modules.load_config sets it for every run
    family = family_for(config.model_type)
    embedding, layer, head = part_sizes(family, config)
    log.info("GPT-NeoX vocab %d hidden %d layers %d: parameters embedding %.2fM, layer %.2fM, head %.2fM; "
             "seq %d, micro-batch 1, 1 thread, %d repeats after %d warm-up", VOCAB, HIDDEN, LAYERS, embedding / 1e6,
             layer / 1e6, head / 1e6, args.seq_length, args.repeats, args.warmup)  # fmt: skip
    for pp in STAGE_COUNTS:
        cfg = run_config(pp, args.seq_length)
        loss_chunk = cfg.chunk_tokens_for(config.vocab_size)
        chosen, compute = splits(cfg, family, config)
        log.info("")
        log.info("pp=%d: cost model per token: layer %.3g FLOPs, head %.3g (= %.2f layers), embedding %.3g; "
                 "loss chunk %s", pp, compute.layer, compute.head, compute.head / compute.layer, compute.embedding,
                 loss_chunk or "off")  # fmt: skip
        passes: list[StagePass] = []
        for name, split in chosen.items():
            passes += build_passes(name, split, cfg, family, config, loss_chunk)
        ms = time_passes(passes, args.repeats, args.warmup)
        report(pp, passes, ms, compute)
        fit_embedding, fit_layer, fit_head = fit_parts(passes, ms)
        log.info("fit over the %d measured stages: layer %.2f ms, head+loss %.2f ms (= %.2f layers; model %.2f), "
                 "embedding %.2f ms (= %.2f layers; model %.2f)", len(passes), fit_layer, fit_head,
                 fit_head / fit_layer, compute.head / compute.layer, fit_embedding, fit_embedding / fit_layer,
                 compute.embedding / compute.layer)  # fmt: skip


if __name__ == "__main__":
    main()
