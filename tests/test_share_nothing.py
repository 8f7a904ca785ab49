"""Sites that share no file system: each keeps its own checkpoint folder, commits are agreed over
the process group, and a site whose disk lacks a checkpoint fetches it from its peer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import STEPS, assert_all_ok, launch, read_metrics, train_args

SITES = ("a", "b")  # pp=2 x dp=2: ranks 0, 1 (replica 0) at site a; ranks 2, 3 (replica 1) at site b


def site_folder(root: Path, rank: int) -> Path:
    return root / SITES[rank // 2] / "ckpt"


def run_sites(shards: Path, tasks: str, root: Path, logs: Path) -> list:
    """Train pp=2 x dp=2 with each site's ranks pointing --checkpoint-path at the site's own folder."""
    logs.mkdir(parents=True, exist_ok=True)
    args = train_args(shards, tasks, root / "unused", pp=2, dp=2, batch=2, micro=1, accum=1)
    results = launch(args, 4, logs, rank_args=lambda rank: ["--checkpoint-path", str(site_folder(root, rank))])
    assert_all_ok(results)
    return results


def weights(directory: Path) -> dict[str, torch.Tensor]:
    names = [p for p in directory.glob("*.safetensors") if p.stem in ("embs", "lm_head") or p.stem.startswith("layer_")]
    return {f"{p.stem}:{k}": v for p in names for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    results = run_sites(tiny_shards, two_tasks, root, root / "logs")
    assert "no shared checkpoint folder: 2 folders, ranks [0, 1] | [2, 3]" in results[0].output
    return root


@pytest.mark.ranks
def test_each_site_keeps_every_stage_and_matches_a_shared_folder(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    args = train_args(tiny_shards, two_tasks, shared, pp=2, dp=2, batch=2, micro=1, accum=1)
    results = launch(args, 4, tmp_path)
    assert_all_ok(results)
    assert "one checkpoint folder shared by every rank" in results[0].output
    expected = weights(shared / f"checkpoint_{STEPS}")
    assert len(expected) > 10
    for site in SITES:
        folder = uninterrupted / site / "ckpt"
        assert (folder / "latest").read_text().strip() == str(STEPS)
        # both stages on both sites (each stage's state on two machines), equal to the shared run's
        ours = weights(folder / f"checkpoint_{STEPS}")
        assert ours.keys() == expected.keys()
        assert all(torch.equal(ours[k], expected[k]) for k in expected), site
        assert (folder / f"checkpoint_{STEPS}" / "trainer_state.json").is_file()
        assert (folder / f"checkpoint_{STEPS}" / "config.json").is_file()  # convert/to_hf.py works at either site


@pytest.mark.ranks
def test_a_site_with_an_empty_disk_fetches_the_checkpoint_from_its_peer(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Site a holds checkpoint 5; site b's disk is empty (a new node). The run resumes at 5 at
    both sites, site b's ranks receive their files from site a (checked against its manifest),
    and it ends bit for bit where the uninterrupted run ended."""
    root = tmp_path / "run"
    shutil.copytree(uninterrupted / "a" / "ckpt" / "checkpoint_5", root / "a" / "ckpt" / "checkpoint_5")
    (root / "a" / "ckpt" / "latest").write_text("5\n")
    (root / "b" / "ckpt").mkdir(parents=True)
    results = run_sites(tiny_shards, two_tasks, root, tmp_path / "logs")
    assert "fetched" in results[2].output and "fetched" not in results[0].output
    fetched = root / "b" / "ckpt" / "checkpoint_5"
    for name in ("layer_0.safetensors", "optim_layer_0.safetensors", "lm_head.safetensors", "trainer_state.json"):
        assert (fetched / name).read_bytes() == (uninterrupted / "a" / "ckpt" / "checkpoint_5" / name).read_bytes()
    rows = read_metrics(root / "a" / "ckpt")
    assert [r["step"] for r in rows] == list(range(6, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(uninterrupted / "a" / "ckpt")][5:]
    expected = weights(uninterrupted / "a" / "ckpt" / f"checkpoint_{STEPS}")
    for site in SITES:
        ours = weights(root / site / "ckpt" / f"checkpoint_{STEPS}")
        assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in expected), site


@pytest.mark.ranks
def test_a_step_no_folder_holds_whole_stops_without_writing(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Site a holds checkpoint 5 without stage 1's weights, site b nothing: no step can be
    resumed, and starting afresh would write over site a's folder, so every rank stops naming
    the missing file."""
    root = tmp_path / "run"
    shutil.copytree(uninterrupted / "a" / "ckpt" / "checkpoint_5", root / "a" / "ckpt" / "checkpoint_5")
    (root / "a" / "ckpt" / "latest").write_text("5\n")
    (root / "a" / "ckpt" / "checkpoint_5" / "lm_head.safetensors").unlink()
    manifest = root / "a" / "ckpt" / "checkpoint_5" / "manifest_stage1.json"
    manifest.unlink()  # as if stage 1 never wrote there
    (root / "b" / "ckpt").mkdir(parents=True)
    args = train_args(tiny_shards, two_tasks, root / "unused", pp=2, dp=2, batch=2, micro=1, accum=1)
    results = launch(args, 4, tmp_path, rank_args=lambda rank: ["--checkpoint-path", str(site_folder(root, rank))])
    for result in results:
        assert result.returncode != 0
        assert "no checkpoint step has every file the ranks need" in result.output
        assert "(nothing was overwritten)" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in (root / "a" / "ckpt").iterdir()) == ["checkpoint_5", "latest"]


@pytest.mark.ranks
def test_a_commit_one_site_did_not_finish_is_completed_from_the_other(
    uninterrupted: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Every rank had reported its manifest for step 10 (so the step was agreed), site a renamed
    it and moved latest, and site b died before renaming: it holds checkpoint 5, latest 5 and a
    torn checkpoint_10.tmp. The relaunch agrees on step 10, site b fetches it, and both folders
    then name 10 as latest with site a's bytes."""
    root = tmp_path / "run"
    shutil.copytree(uninterrupted / "a", root / "a")
    site_b = root / "b" / "ckpt"
    shutil.copytree(uninterrupted / "b" / "ckpt" / "checkpoint_5", site_b / "checkpoint_5")
    (site_b / "latest").write_text("5\n")
    torn = site_b / f"checkpoint_{STEPS}.tmp"
    shutil.copytree(uninterrupted / "b" / "ckpt" / f"checkpoint_{STEPS}", torn)
    (torn / "layer_0.safetensors").write_bytes(b"half a file")
    results = run_sites(tiny_shards, two_tasks, root, tmp_path / "logs")
    assert "nothing to do: the checkpoint is at step 10" in results[3].output
    assert (site_b / "latest").read_text().strip() == str(STEPS)
    ours, theirs = site_b / f"checkpoint_{STEPS}", uninterrupted / "a" / "ckpt" / f"checkpoint_{STEPS}"
    assert {p.name: p.read_bytes() for p in ours.glob("*.safetensors")} == {
        p.name: p.read_bytes() for p in theirs.glob("*.safetensors")
    }


@pytest.mark.parametrize(
    ("disk_of", "writers"),
    [
        ((0, 0, 0, 0), {0, 1}),  # one shared folder: replica 0 writes, as ever
        ((0, 0, 2, 2), {0, 1, 2, 3}),  # a site per replica: both sites hold both stages
        ((0, 1, 2, 3), {0, 1, 2, 3}),  # a folder per rank: each keeps its own stage
        ((0, 0, 0, 3), {0, 1, 3}),  # rank 3 alone: its stage is on disk 0 already, but not on its own
    ],
)
def test_who_writes_keeps_every_stage_on_every_folder(disk_of: tuple[int, ...], writers: set[int]) -> None:
    from comm.topology import Topology
    from trainer.checkpoint import Disks

    disks = Disks(disk_of)
    chosen = {r for r in range(4) if disks.writes(Topology(pipeline_size=2, data_size=2, rank=r), every_replica=False)}
    assert chosen == writers
    for disk in set(disk_of):  # a folder holds each stage that one of its ranks trains, once
        stages = [r % 2 for r in chosen if disk_of[r] == disk]
        assert sorted(stages) == sorted({r % 2 for r in range(4) if disk_of[r] == disk})
