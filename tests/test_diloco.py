"""--dp-mode diloco: inner AdamW steps per replica, outer Nesterov steps on averaged pseudo-gradients."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    LOSS_ATOL,
    SEED,
    SEQ,
    STEPS,
    assert_all_ok,
    assert_same_state,
    launch,
    load_hf_state,
    read_metrics,
    train_args,
)
from trainer.config import DataParallelConfig

OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9


def diloco_reference(
    hf_dir: Path, tasks: str, sync_every: int, fragments: int, overlap: int
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two HF models in one process, each training on its replica's half of every global batch
    (4 of 8 sequences), meeting as DiLoCo says: every ``sync_every / fragments`` steps one
    fragment's (block i: fragment i % F; the rest: 0) averaged pseudo-gradient makes an outer
    Nesterov step on the anchor, landing ``overlap`` steps later on top of the progress made
    since; the last step syncs everything. Returns the mean loss per step and the final weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from data.stream import TokenStream, parse_task_names
    from tests.helpers import LR, WARMUP

    models = [AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").train() for _ in range(2)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0) for m in models]
    schedulers = [get_linear_schedule_with_warmup(o, WARMUP, STEPS) for o in optimizers]
    stream = TokenStream(parse_task_names(tasks), AutoTokenizer.from_pretrained(hf_dir), SEQ, SEED)
    names = [n for n, _ in models[0].named_parameters()]
    params = [dict(m.named_parameters()) for m in models]
    anchor = {n: params[0][n].detach().clone() for n in names}
    momentum = {n: torch.zeros_like(anchor[n]) for n in names}

    def fragment_of(name: str) -> int:
        block = re.search(r"\.layers\.(\d+)\.", name)
        return int(block.group(1)) % fragments if block else 0

    def start(fragment: int) -> tuple[list[str], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        mine = [n for n in names if fragment_of(n) == fragment]
        mean = {n: ((anchor[n] - params[0][n]) + (anchor[n] - params[1][n])) / 2 for n in mine}
        sent = [{n: p[n].detach().clone() for n in mine} for p in params]
        return mine, mean, sent

    def land(sync: tuple, keep_progress: bool) -> None:
        mine, mean, sent = sync
        for n in mine:
            momentum[n].mul_(OUTER_MOMENTUM).add_(mean[n])
            anchor[n].sub_(mean[n] + OUTER_MOMENTUM * momentum[n], alpha=OUTER_LR)
            for r in range(2):
                params[r][n].copy_(params[r][n] + anchor[n] - sent[r][n] if keep_progress else anchor[n])

    losses, pending, interval = [], None, sync_every // fragments
    for step in range(1, STEPS + 1):
        batch = stream.next_batch(8)
        step_losses = []
        for r, (model, optimizer, scheduler) in enumerate(zip(models, optimizers, schedulers, strict=True)):
            mine = slice(4 * r, 4 * r + 4)
            loss = model(
                input_ids=batch.input_ids[mine],
                labels=batch.labels[mine],
                position_ids=batch.positions()[mine],
                use_cache=False,
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step_losses.append(loss.item())
        losses.append(sum(step_losses) / 2)
        with torch.no_grad():
            if pending is not None and (pending[0] == step or step == STEPS):
                land(pending[1], keep_progress=True)
                pending = None
            if step == STEPS:
                for f in range(fragments):
                    land(start(f), keep_progress=False)
            elif step % interval == 0:
                sync = start((step // interval - 1) % fragments)
                if overlap:
                    pending = (step + overlap, sync)
                else:
                    land(sync, keep_progress=False)
    return losses, {k: v.detach().clone() for k, v in models[0].state_dict().items()}


def diloco_args(shards: Path, tasks: str, ckpt: Path, pp: int, *extra: str) -> list[str]:
    return [
        *train_args(shards, tasks, ckpt, pp=pp, dp=2, batch=4, micro=2, accum=1),
        "--dp-mode", "diloco", "--outer-lr", str(OUTER_LR), "--outer-momentum", str(OUTER_MOMENTUM), *extra,
    ]  # fmt: skip


def replica_weights(directory: Path, replica: int) -> dict[str, torch.Tensor]:
    prefix = f"replica{replica}_" if replica else ""
    weights = {}
    for path in sorted(directory.glob(f"{prefix}*.safetensors")):
        part = path.name.removeprefix(prefix)
        if not re.fullmatch(r"(embs|layer_\d+|lm_head)\.safetensors", part):
            continue  # optimizer and outer state, or (replica 0) other replicas' files
        weights.update({f"{part}:{k}": v for k, v in load_file(path).items()})
    return weights


@pytest.mark.ranks
@pytest.mark.parametrize(
    ("sync_every", "fragments", "overlap"),
    [(3, 1, 0), (4, 2, 1)],
    ids=["diloco", "streaming-overlapped"],
)
def test_diloco_matches_two_replicas_with_outer_nesterov_steps(
    tiny_hf: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path, sync_every: int, fragments: int, overlap: int
) -> None:
    from convert.to_hf import convert_to_hf

    ckpt = tmp_path / "ckpt"
    flags = ["--sync-every", str(sync_every), "--diloco-fragments", str(fragments),
             "--diloco-overlap-steps", str(overlap), "--checkpoint-steps", "3"]  # fmt: skip
    args = diloco_args(tiny_shards, two_tasks, ckpt, 2, *flags)
    assert_all_ok(launch(args, 4, tmp_path))
    losses, state = diloco_reference(tiny_hf, two_tasks, sync_every, fragments, overlap)
    rows = read_metrics(ckpt)
    assert [r["loss"] for r in rows] == pytest.approx(losses, abs=LOSS_ATOL, rel=0)
    assert_same_state(load_hf_state(convert_to_hf(ckpt, tmp_path / "hf")), state)
    final = ckpt / f"checkpoint_{STEPS}"
    first, second = replica_weights(final, 0), replica_weights(final, 1)
    assert first.keys() == second.keys() and len(first) > 10
    assert all(torch.equal(first[k], second[k]) for k in first)  # the last step leaves one model
    # between syncs the replicas differ: each checkpoint holds both (step 3 is a sync only when H = 3)
    middle = ckpt / "checkpoint_6" if sync_every == 4 else ckpt / "checkpoint_3"
    differ = [k for k in first if not torch.equal(replica_weights(middle, 0)[k], replica_weights(middle, 1)[k])]
    assert bool(differ) == (sync_every == 4)
    # the syncs crossed the replicas' link: a row counts a sync's bytes at the step after it landed
    synced = {r["step"] for r in rows if r["dp_bytes"] > 10_000}
    interval = sync_every // fragments
    assert synced == {s + overlap + 1 for s in range(interval, STEPS - overlap, interval)}


@pytest.mark.ranks
@pytest.mark.parametrize("compress", ["none", "int8"])
def test_streaming_diloco_resumes_exactly_with_a_sync_in_flight(
    tiny_shards: Path, two_tasks: str, tmp_path: Path, compress: str
) -> None:
    """Checkpoint 6 is written while fragment 0's sum (started after step 6) is in flight; the
    resumed run lands it after step 7 as the uninterrupted run did, to the last bit (compressed:
    with each replica's error feedback restored too)."""
    flags = ["--sync-every", "4", "--diloco-fragments", "2", "--checkpoint-steps", "6", "--dp-compress", compress]
    ckpt = tmp_path / "ckpt"
    assert_all_ok(launch(diloco_args(tiny_shards, two_tasks, ckpt, 2, *flags), 4, tmp_path))
    outer = load_file(ckpt / "checkpoint_6" / "replica1_outer_layer_0.safetensors")
    assert any(k.endswith(".sum") for k in outer)  # block 0 is fragment 0: in flight at step 6
    assert any(k.endswith(".residual") for k in outer) == (compress != "none")

    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(ckpt / "checkpoint_6", again / "ckpt" / "checkpoint_6")
    (again / "ckpt" / "latest").write_text("6\n")
    assert_all_ok(launch(diloco_args(tiny_shards, two_tasks, again / "ckpt", 2, *flags), 4, again))
    resumed = read_metrics(again / "ckpt")
    assert [r["step"] for r in resumed] == list(range(7, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in read_metrics(ckpt)][6:]
    for replica in (0, 1):
        ours = replica_weights(again / "ckpt" / f"checkpoint_{STEPS}", replica)
        theirs = replica_weights(ckpt / f"checkpoint_{STEPS}", replica)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), replica


@pytest.mark.ranks
def test_compressed_pseudo_gradients_send_a_quarter(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    runs = {}
    for method in ("none", "int8"):
        folder = tmp_path / method
        folder.mkdir()
        args = diloco_args(tiny_shards, two_tasks, folder / "ckpt", 1, "--sync-every", "5", "--dp-compress", method)
        assert_all_ok(launch(args, 2, folder))
        runs[method] = read_metrics(folder / "ckpt")
    plain, int8 = ({r["step"]: r["dp_bytes"] for r in runs[m]} for m in ("none", "int8"))
    # the row after a sync counts its bytes (fp32 all-reduce of two: the buffer once); others the loss alone
    assert plain[6] > 100_000 and int8[6] <= 0.27 * plain[6] and plain[7] < 100
    losses = [r["loss"] for r in runs["int8"]]
    assert losses == pytest.approx([r["loss"] for r in runs["none"]], rel=0.01)
    assert losses[:5] == [r["loss"] for r in runs["none"]][:5]  # before the first sync they are one run


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"mode": "diloco", "sync_every": 6, "fragments": 4},
            "must be a multiple of --diloco-fragments 4",
        ),
        ({"mode": "diloco", "sync_every": 8, "fragments": 4, "overlap_steps": 2}, "must be >= 0 and below"),
        ({"mode": "diloco", "outer_momentum": 1.0}, "--outer-momentum in [0, 1)"),
        ({"mode": "local", "fragments": 2}, "need --dp-mode diloco"),
        ({"mode": "diloco", "shard_optimizer": True}, "--shard-optimizer needs --dp-mode allreduce"),
    ],
)
def test_bad_diloco_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DataParallelConfig(**kwargs)
