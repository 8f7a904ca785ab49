"""--shard-optimizer (ZeRO stage 1): the same training bit for bit with half of AdamW's state per
replica at dp=2, and checkpoints that any topology resumes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from convert.from_hf import convert_from_hf
from convert.tiny_model import build_tiny_model
from convert.to_hf import convert_to_hf
from data_parallel.flat import FlatLayout
from tests.helpers import (
    LOSS_ATOL,
    RankResult,
    assert_all_ok,
    bundled_texts,
    launch,
    load_hf_state,
    read_metrics,
    resume_elsewhere,
    train_args,
)

SHARD = ("--shard-optimizer",)
LORA = ("--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0")


def pp2_dp2(shards: Path, tasks: str, ckpt: Path, *extra: str) -> list[str]:
    return [*train_args(shards, tasks, ckpt, pp=2, dp=2, batch=2, micro=1, accum=1), *extra]


def run(shards: Path, tasks: str, folder: Path, *extra: str) -> list[RankResult]:
    folder.mkdir(parents=True)
    results = launch(pp2_dp2(shards, tasks, folder / "ckpt", *extra), 4, folder)
    assert_all_ok(results)
    return results


def rows(ckpt: Path) -> list[dict]:
    return [r for r in read_metrics(ckpt) if "loss" in r]


def from_step_5(source: Path, folder: Path) -> Path:
    """A checkpoint folder holding only ``source``'s step 5, to resume from there."""
    ckpt = folder / "ckpt"
    shutil.copytree(source / "checkpoint_5", ckpt / "checkpoint_5")
    (ckpt / "latest").write_text("5\n")
    return ckpt


def held_state_bytes(results: list[RankResult]) -> dict[int, int]:
    """AdamW state each rank counted tensor by tensor after its first update (its log line)."""
    found = {r.rank: re.search(r"optimizer state held on this rank: \S+ GB \((\d+) bytes\)", r.output) for r in results}
    assert all(found.values()), "a rank did not log its optimizer state"
    return {rank: int(match.group(1)) for rank, match in found.items()}


def assert_same_training(sharded: Path, plain: Path) -> None:
    """Bit for bit: every loss and gradient norm, and every file of every checkpoint (weights
    and optimizer state: a sharded run saves what an unsharded one saves)."""
    ours, theirs = rows(sharded), rows(plain)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in ours] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in theirs
    ]
    assert ours[-1]["loss"] < ours[0]["loss"]
    for step in ("checkpoint_5", "checkpoint_10"):
        names = sorted(p.name for p in (plain / step).glob("*.safetensors"))
        assert names and names == sorted(p.name for p in (sharded / step).glob("*.safetensors"))
        for name in names:
            assert (sharded / step / name).read_bytes() == (plain / step / name).read_bytes(), f"{step}/{name}"


def test_layout_cuts_the_same_pieces_for_any_shard_count() -> None:
    sizes = [5000, 3, 70000, 1024, 999, 131072]
    layouts = [FlatLayout(sizes, shards) for shards in (1, 2, 3, 8)]
    assert all(layout.pieces == layouts[0].pieces for layout in layouts)
    for layout in layouts:
        # the pieces tile every parameter, in order, with nothing left over
        assert [b - a for _, a, b in layout.pieces] and sum(b - a for _, a, b in layout.pieces) == sum(sizes)
        assert all(prev[2] == nxt[1] for prev, nxt in zip(layout.pieces, layout.pieces[1:], strict=False))
        # each piece lies inside one shard, and padding stays under one block per shard
        assert all(a // layout.shard_size == (b - 1) // layout.shard_size for _, a, b in layout.pieces)
        shards = layout.padded // layout.shard_size
        assert layout.padded - layout.total < shards * layout.block + layout.block


@pytest.fixture(scope="module")
def runs(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """The tiny GPT-NeoX at pp=2 x dp=2 for 10 steps (checkpoints at 5 and 10), without and with sharding."""
    tmp = tmp_path_factory.mktemp("sharding")
    return {
        name: (tmp / name / "ckpt", run(tiny_shards, two_tasks, tmp / name, *extra))
        for name, extra in (("plain", ()), ("sharded", SHARD))
    }


@pytest.mark.ranks
def test_sharded_training_is_bit_identical_and_holds_half_the_state(runs: dict) -> None:
    (plain, plain_logs), (sharded, sharded_logs) = runs["plain"], runs["sharded"]
    assert_same_training(sharded, plain)
    # each replica holds AdamW's moments for half of its stage (and a block of padding at most)
    full, half = held_state_bytes(plain_logs), held_state_bytes(sharded_logs)
    for rank in full:
        assert 0.45 * full[rank] < half[rank] < 0.55 * full[rank], (rank, half[rank], full[rank])
    # the wire: a reduce-scatter and an all-gather carry what one all-reduce did (rows from step 2
    # on count the previous step's all-gather; checkpoint steps add the state gathered to save it)
    steady = {r["dp_bytes"] for r in rows(sharded)[1:] if r["step"] not in (6,)}
    (reduced,) = {r["dp_bytes"] for r in rows(plain)}
    assert len(steady) == 1 and reduced <= steady.pop() < 1.1 * reduced


@pytest.mark.ranks
def test_sharded_checkpoint_resumes_bit_exact_in_its_topology(
    runs: dict, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    sharded, _ = runs["sharded"]
    ckpt = from_step_5(sharded, tmp_path)
    assert_all_ok(launch(pp2_dp2(tiny_shards, two_tasks, ckpt, *SHARD), 4, tmp_path))
    assert [(r["step"], r["loss"]) for r in rows(ckpt)] == [(r["step"], r["loss"]) for r in rows(sharded)[5:]]
    for name in (p.name for p in (sharded / "checkpoint_10").glob("*.safetensors")):
        assert (ckpt / "checkpoint_10" / name).read_bytes() == (sharded / "checkpoint_10" / name).read_bytes(), name


@pytest.mark.ranks
def test_sharded_checkpoint_resumes_unsharded_in_one_process(
    runs: dict, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    sharded, _ = runs["sharded"]
    final = load_hf_state(convert_to_hf(sharded, tmp_path / "final"))
    resume_elsewhere(tiny_shards, two_tasks, sharded, final, tmp_path / "resumed")


@pytest.mark.ranks
def test_unsharded_checkpoint_resumes_sharded_over_other_replicas(
    runs: dict, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """pp=2 x dp=2 unsharded at step 5, resumed at pp=1 x dp=2 sharded: the same steps 6..10."""
    plain, _ = runs["plain"]
    ckpt = from_step_5(plain, tmp_path)
    args = train_args(tiny_shards, two_tasks, ckpt, pp=1, dp=2, batch=2, micro=1, accum=1)
    assert_all_ok(launch([*args, *SHARD], 2, tmp_path))
    expected = [r["loss"] for r in rows(plain)[5:]]
    assert [r["step"] for r in rows(ckpt)] == list(range(6, 11))
    assert [r["loss"] for r in rows(ckpt)] == pytest.approx(expected, abs=LOSS_ATOL, rel=0)


@pytest.mark.ranks
def test_sharded_lora_in_bf16_is_bit_identical(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    """Adapters only are trained (and sharded); frozen weights in bf16 under autocast."""
    plain = run(tiny_shards, two_tasks, tmp_path / "plain", *LORA, "--bf16")
    sharded = run(tiny_shards, two_tasks, tmp_path / "sharded", *LORA, "--bf16", *SHARD)
    assert_same_training(tmp_path / "sharded" / "ckpt", tmp_path / "plain" / "ckpt")
    full, half = held_state_bytes(plain), held_state_bytes(sharded)
    assert all(half[rank] < 0.6 * full[rank] for rank in full)


@pytest.mark.ranks
def test_sharded_fp16_with_tied_embeddings_is_bit_identical(two_tasks: str, tmp_path: Path) -> None:
    """LLaMA with tied input and output embeddings on different stages, fp16 with loss scaling."""
    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), "llama", num_layers=4, seed=1)
    shards = convert_from_hf(hf, tmp_path / "shards")
    run(shards, two_tasks, tmp_path / "plain", "--fp16")
    run(shards, two_tasks, tmp_path / "sharded", "--fp16", *SHARD)
    assert_same_training(tmp_path / "sharded" / "ckpt", tmp_path / "plain" / "ckpt")
    assert any(r["grad_norm"] > 1.0 for r in rows(tmp_path / "plain" / "ckpt"))  # clipping acted


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--dp-mode", "local"), "--shard-optimizer needs --dp-mode allreduce"),
        (("--dp-compress", "int8"), "--shard-optimizer cannot be combined with --dp-compress"),
        (("--optimizer", "8bit-adam"), "use --optimizer adamw, or drop --shard-optimizer"),
    ],
)
def test_sharding_refuses_what_it_cannot_do(two_tasks: str, extra: tuple, message: str) -> None:
    from trainer.cli import config_from_args, parse_args

    base = ["--model-name", "unused", "--task-name", two_tasks, "--use-cuda", "false", "--rank", "0"]
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_args(parse_args([*base, "--zero-stage", "1", *extra]))
    assert config_from_args(parse_args([*base, "--zero-stage", "1"])).dp.shard_optimizer


def _collectives_rank(rank: int, port: int, staged: bool, out: str) -> None:
    import json

    import torch

    import comm.collectives as collectives
    from comm.config import CommConfig
    from comm.process_group import Communicator
    from comm.topology import Topology

    torch.set_num_threads(1)
    topo = Topology(rank, 1, 3)  # three replicas of one stage
    cfg = CommConfig(dist_url=f"tcp://127.0.0.1:{port}", host_staging=staged, timeout_s=60)
    comm = Communicator.connect(topo, cfg, torch.device("cpu"))
    size = 13  # values per replica's slice: chunks of 5 leave a short one
    results = {}
    for chunk in (collectives.GLOO_CHUNK, 5):
        collectives.GLOO_CHUNK = chunk
        before = comm.dp_bytes_sent
        grads = torch.arange(3 * size, dtype=torch.float32) * (rank + 1)
        comm.reduce_scatter_data(grads[rank * size : (rank + 1) * size], grads)  # in place, as the optimizer does
        weights = torch.zeros(3 * size)
        weights[rank * size : (rank + 1) * size] = torch.arange(size) + 100 * rank
        comm.all_gather_data_into(weights, weights[rank * size : (rank + 1) * size])
        mine = grads[rank * size : (rank + 1) * size].tolist()
        results[chunk] = [mine, weights.tolist(), comm.dp_bytes_sent - before]
    before = comm.dp_bytes_sent
    comm.all_reduce_data(torch.zeros(3 * size))
    results["all-reduce"] = comm.dp_bytes_sent - before
    comm.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(list(results.values())))


@pytest.mark.parametrize("staged", [False, True])
def test_reduce_scatter_and_all_gather_in_chunks_and_in_place(staged: bool, tmp_path: Path) -> None:
    """Gloo gets the collectives in chunks (it copies whatever it is handed): the same sums, the
    same gathered weights and the same bytes as in one piece, over three replicas, also when
    the output is the input's own slice and through host buffers."""
    import json

    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.start_processes(_collectives_rank, args=(free_port(), staged, str(tmp_path)), nprocs=3, start_method="spawn")
    for rank in range(3):
        whole, chunked, all_reduce = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert whole == chunked
        summed, gathered, sent = whole
        assert summed == [6.0 * v for v in range(rank * 13, (rank + 1) * 13)]  # 1 + 2 + 3 times each value
        assert gathered == [float(v % 13 + 100 * (v // 13)) for v in range(39)]
        assert sent == all_reduce  # together, the bytes of one all-reduce of the buffer
