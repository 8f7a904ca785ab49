"""Data-parallel options for slow links between replicas: compressed gradient sums, local SGD."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comm.compress import GradientCompressor
from tests.helpers import SEED, SEQ, assert_all_ok, assert_same_state, launch, load_hf_state, read_metrics, train_args


def dp2_args(shards: Path, tasks: str, ckpt: Path, *extra: str) -> list[str]:
    return [*train_args(shards, tasks, ckpt, pp=1, dp=2, batch=4, micro=2, accum=1), *extra]


def test_error_feedback_sends_what_was_dropped_later() -> None:
    grad = torch.randn(5000)
    for method in ("fp16", "int8", "topk"):
        compressor = GradientCompressor(method, topk_ratio=0.05)
        sent = torch.zeros_like(grad)
        for _ in range(60):  # the same gradient every step: what is sent must add up to it
            sent += compressor.decode_sum([compressor.encode(grad)], grad.numel())
        if method != "topk":  # the residual left is at most one step's rounding, spread over 60 steps
            assert torch.allclose(sent / 60, grad, atol=5e-4), method
        assert torch.allclose(sent + compressor.residual, 60 * grad, atol=1e-3)  # nothing lost, only delayed


def test_two_round_compressed_sum_loses_nothing_only_delays_it() -> None:
    """Four replicas sum in chunks: each compresses its gradient (feedback kept per replica),
    each chunk's owner compresses the chunk's sum again (feedback kept per owner). Whatever the
    two roundings drop comes back in later steps: sent + every residual = steps x the true sum."""
    n, numel, steps = 4, 3000, 40
    grads = [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(n)]
    for method in ("fp16", "int8", "topk"):
        replicas = [GradientCompressor(method, topk_ratio=0.05) for _ in range(n)]
        length = replicas[0].chunk_length(numel, n)
        sent = torch.zeros(n * length)
        for _ in range(steps):
            parts = [c.encode_parts(g, n) for c, g in zip(replicas, grads, strict=True)]
            sums = [c.decode_sum([parts[r][i] for r in range(n)], length) for i, c in enumerate(replicas)]
            payloads = [c.encode_chunk_sum(total) for c, total in zip(replicas, sums, strict=True)]
            sent += torch.cat([replicas[0].decode_sum([p], length) for p in payloads])
        kept = sum(c.residual for c in replicas) + torch.cat([c.chunk_residual for c in replicas])
        truth = torch.nn.functional.pad(sum(grads), (0, n * length - numel))
        assert torch.allclose(sent + kept, steps * truth, atol=1e-3), method
        if method != "topk":
            assert torch.allclose(sent / steps, truth, atol=2e-2), method


@pytest.mark.ranks
def test_compressed_sums_over_four_replicas_send_two_payloads(tiny_shards: Path, two_tasks: str,
                                                               tmp_path: Path) -> None:  # fmt: skip
    """An all-gather would send n - 1 = 3 payloads from each replica; the chunked sum sends 2 (n-1)/n:
    half of that, and a quarter of what the fp32 all-reduce sends for int8."""
    runs = {}
    for method in ("none", "fp16", "int8"):
        folder = tmp_path / method
        folder.mkdir()
        args = [*train_args(tiny_shards, two_tasks, folder / "ckpt", pp=1, dp=4, batch=2, micro=1, accum=1),
                "--dp-compress", method, "--total-steps", "6"]  # fmt: skip
        assert_all_ok(launch(args, 4, folder))
        runs[method] = read_metrics(folder / "ckpt")
    plain = runs["none"][0]["dp_bytes"]  # counted as the ring all-reduce hands them over: 2 (n-1)/n of fp32
    assert max(r["dp_bytes"] for r in runs["fp16"]) <= 0.51 * plain  # an all-gather of fp16: 1.0 x plain
    assert max(r["dp_bytes"] for r in runs["int8"]) <= 0.26 * plain  # an all-gather of int8: 0.5 x plain
    for method in ("fp16", "int8"):
        losses = [r["loss"] for r in runs[method]]
        assert losses == pytest.approx([r["loss"] for r in runs["none"]], rel=0.01), method


@pytest.fixture(scope="module")
def model_numel(tiny_shards: Path) -> int:
    return sum(t.numel() for p in tiny_shards.glob("*.safetensors") for t in load_file(p).values())


@pytest.mark.ranks
def test_compressed_gradient_sums(tiny_shards: Path, two_tasks: str, tmp_path: Path, model_numel: int) -> None:
    runs = {}
    for method in ("none", "fp16", "int8", "topk"):
        folder = tmp_path / method
        folder.mkdir()
        assert_all_ok(launch(dp2_args(tiny_shards, two_tasks, folder / "ckpt", "--dp-compress", method), 2, folder))
        runs[method] = read_metrics(folder / "ckpt")
    n = model_numel
    # beside the gradients, one exact fp32 all-reduce carries the loss and a preemption notice
    # slot per replica (run.preemption): 3 values
    totals = 3 * 4
    expected = {
        "none": n * 4 + totals,  # ring all-reduce of n fp32 gradients and the totals: 2(n-1)/n of it, n=2
        "fp16": n * 2 + totals,  # all-gather of fp16 from the other replica, plus the totals
        "int8": math.ceil(n / 1024) * (1024 + 4) + totals,  # int8 values padded to whole chunks, a scale each
        "topk": int(n * 0.01) * 8 + totals,  # fp32 values and int32 indices
    }
    for method, rows in runs.items():
        assert {r["dp_bytes"] for r in rows} == {expected[method]}, method
    plain = [r["loss"] for r in runs["none"]]
    for method in ("fp16", "int8"):
        assert [r["loss"] for r in runs[method]] == pytest.approx(plain, rel=0.01), method
    topk = [r["loss"] for r in runs["topk"]]
    assert topk[-1] < topk[0] - 0.1  # 1% of the gradient per step, the rest fed back: it still learns


LOCAL_SGD = ("--dp-mode", "local", "--sync-every", "3", "--checkpoint-steps", "4")  # checkpoints between syncs


@pytest.fixture(scope="module")
def local_sgd_run(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pp=1 x dp=2 local SGD over 10 steps, synced at 3, 6, 9 and 10, checkpoints at 4, 8 and 10."""
    folder = tmp_path_factory.mktemp("local_sgd")
    assert_all_ok(launch(dp2_args(tiny_shards, two_tasks, folder / "ckpt", *LOCAL_SGD), 2, folder))
    return folder / "ckpt"


@pytest.mark.ranks
def test_local_sgd_matches_replicas_averaged_every_h_steps(tiny_hf: Path, two_tasks: str, local_sgd_run: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from data.stream import TokenStream, parse_task_names
    from tests.helpers import LR, STEPS, WARMUP

    ckpt = local_sgd_run

    # Oracle: two HF models, each training on its replica's slices alone, averaged every 3 steps.
    models = [AutoModelForCausalLM.from_pretrained(tiny_hf, attn_implementation="sdpa").train() for _ in range(2)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0) for m in models]
    schedulers = [get_linear_schedule_with_warmup(o, WARMUP, STEPS) for o in optimizers]
    stream = TokenStream(parse_task_names(two_tasks), AutoTokenizer.from_pretrained(tiny_hf), SEQ, SEED)
    for step in range(1, STEPS + 1):
        batch = stream.next_batch(8)
        for r, (model, optimizer, scheduler) in enumerate(zip(models, optimizers, schedulers, strict=True)):
            mine = slice(4 * r, 4 * r + 4)
            positions = batch.positions()[mine]
            out = model(
                input_ids=batch.input_ids[mine], labels=batch.labels[mine], position_ids=positions, use_cache=False
            )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if step % 3 == 0 or step == STEPS:
            with torch.no_grad():
                for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
                    mean = (a + b) / 2
                    a.copy_(mean)
                    b.copy_(mean)
    from convert.to_hf import convert_to_hf

    assert_same_state(load_hf_state(convert_to_hf(ckpt, tmp_path / "hf")), models[0].state_dict())


@pytest.mark.ranks
def test_local_sgd_resumes_exactly_from_a_checkpoint_between_syncs(
    tiny_shards: Path, two_tasks: str, local_sgd_run: Path, tmp_path: Path
) -> None:
    """At step 4 the replicas have stepped alone since the sync at 3: each saved its own weights
    and AdamW moments (replica 1's prefixed), so a run resumed there ends as the uninterrupted one."""
    from tests.pp2_dp2 import checkpoint_tensors, last_rows

    saved = checkpoint_tensors(local_sgd_run, 4)
    weight = "attention.dense.weight"
    kinds = {"layer_0.safetensors/" + weight, "replica1_layer_0.safetensors/" + weight}
    assert kinds <= saved.keys()
    assert not torch.equal(*(saved[k] for k in sorted(kinds)))  # two replicas' own weights, not one copied

    ckpt = tmp_path / "ckpt"
    shutil.copytree(local_sgd_run / "checkpoint_4", ckpt / "checkpoint_4")
    (ckpt / "latest").write_text("4\n")
    assert_all_ok(launch(dp2_args(tiny_shards, two_tasks, ckpt, *LOCAL_SGD), 2, tmp_path))
    uninterrupted, resumed = last_rows(local_sgd_run), last_rows(ckpt)
    assert [resumed[s] for s in range(5, 11)] == [uninterrupted[s] for s in range(5, 11)]
    here, there = checkpoint_tensors(ckpt, 10), checkpoint_tensors(local_sgd_run, 10)
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)


def test_rollback_forgets_a_skipped_step() -> None:
    compressor = GradientCompressor("int8")
    compressor.encode(torch.randn(3000))
    kept = compressor.residual.clone()
    compressor.encode(torch.full((3000,), float("inf")))  # an overflowed step
    compressor.rollback()
    assert torch.equal(compressor.residual, kept)


@pytest.mark.ranks
def test_tied_copies_stay_equal_under_compressed_sums(two_tasks: str, tmp_path: Path) -> None:
    from convert.from_hf import convert_from_hf
    from convert.tiny_model import build_tiny_model
    from tests.helpers import bundled_texts

    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), "gpt2", num_layers=4, seed=2)
    shards = convert_from_hf(hf, tmp_path / "shards")
    ckpt = tmp_path / "ckpt"
    args = [*train_args(shards, two_tasks, ckpt, pp=2, dp=2, batch=2, micro=1, accum=1), "--dp-compress", "int8"]
    assert_all_ok(launch(args, 4, tmp_path))
    embedding = load_file(ckpt / "checkpoint_10" / "embs.safetensors")["wte.weight"]
    head = load_file(ckpt / "checkpoint_10" / "lm_head.safetensors")["lm_head.weight"]
    assert torch.equal(embedding, head)
