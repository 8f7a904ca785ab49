"""The recipes users copy (recipes/*.yaml, for --config) cannot rot: each parses with every
flag known and builds valid configs, says how it is launched, and two of them train two steps on
the tiny model: the DPO one through the SLURM launcher (SLURM's task ids as ranks), the two-site
DiLoCo one as plain ranks."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from comm.rendezvous import free_port
from tests.helpers import OFFLINE_ENV, ROOT, assert_all_ok, launch, read_metrics
from tests.preference_runs import write_pairs
from trainer.cli import config_from_args, parse_args

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PATH_FLAGS = ("model-name", "task-name", "evaluation-data", "checkpoint-path")


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Stand-ins for a recipe's data: text, and preference pairs."""
    from tests.helpers import bundled_texts, write_jsonl

    root = tmp_path_factory.mktemp("recipe_data")
    texts = bundled_texts()
    return {"text": str(write_jsonl(root / "chat.jsonl", texts[:100])),
            "pairs": str(write_pairs(root / "pairs.jsonl", texts[:100], 7))}  # fmt: skip


def on_tiny(recipe: Path, shards: Path, data: dict[str, str], ckpt: Path, *, short: bool = False) -> list[str]:
    """The recipe's flags with its paths pointed at the tiny model and data (and with ``short``,
    sequences, batches and steps cut to a 2-step run)."""
    values = yaml.safe_load(recipe.read_text())
    kind = "pairs" if values.get("objective") in ("dpo", "reward") else "text"
    args = ["--config", str(recipe), "--model-name", str(shards), "--task-name", data[kind],
            "--checkpoint-path", str(ckpt)]  # fmt: skip
    if "evaluation-data" in values:
        args += ["--evaluation-data", data[kind], "--evaluation-num-batch", "1"]
    if short:
        args += ["--seq-length", "32", "--batch-size", "2", "--micro-batch-size", "1", "--total-steps", "2",
                 "--warmup-steps", "1", "--checkpoint-steps", "2"]  # fmt: skip
    return args


def test_the_recipes_cover_each_method() -> None:
    kinds = [yaml.safe_load(r.read_text()) for r in RECIPES]
    assert any(k.get("lora-rank") for k in kinds) and any(not k.get("lora-rank") for k in kinds)
    assert {k.get("objective", "lm") for k in kinds} == {"lm", "dpo", "reward", "grpo"}
    assert any(k.get("dp-mode") == "diloco" for k in kinds) and any(k.get("pp-compress") for k in kinds)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_a_recipe_parses_builds_valid_configs_and_says_how_to_launch_it(
    recipe: Path, tiny_shards: Path, recipe_data: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    values = yaml.safe_load(recipe.read_text())
    args = parse_args(["--rank", "0", *on_tiny(recipe, tiny_shards, recipe_data, tmp_path / "ckpt")])
    for key, value in values.items():  # every setting reaches its flag (a typo would have stopped parse_args)
        if key not in PATH_FLAGS:
            assert getattr(args, key.replace("-", "_")) == value, key
    cfg = config_from_args(args)  # every check of the flags together
    assert cfg.topology.world_size == values["world-size"]
    assert f"--config recipes/{recipe.name}" in recipe.read_text()  # its comment says how to launch it


def test_a_precision_on_the_command_line_replaces_the_recipe_s(tiny_shards: Path) -> None:
    """--fp16 and --bf16 exclude each other: one given on the command line wins over the other
    from the recipe (the file alone would otherwise leave both set)."""
    recipe = ["--config", str(ROOT / "recipes" / "llama3-8b-full.yaml"), "--model-name", str(tiny_shards)]
    assert yaml.safe_load((ROOT / "recipes" / "llama3-8b-full.yaml").read_text())["bf16"] is True
    as_written = parse_args(recipe)
    assert (as_written.bf16, as_written.fp16) == (True, False)
    overridden = parse_args([*recipe, "--fp16"])
    assert (overridden.fp16, overridden.bf16) == (True, False)


@pytest.mark.ranks
def test_the_dpo_recipe_trains_through_the_slurm_launcher(
    tiny_shards: Path, recipe_data: dict[str, str], tmp_path: Path
) -> None:
    """example_scripts/slurm_rank.sh as srun runs it, once per task: SLURM's ids as ranks and GPUs."""
    recipe = ROOT / "recipes" / "mistral-7b-dpo-lora.yaml"
    ckpt = tmp_path / "ckpt"
    world = yaml.safe_load(recipe.read_text())["world-size"]
    port = free_port()
    procs = []
    for task in range(world):
        env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(task),
               "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(task), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}  # fmt: skip
        log = open(tmp_path / f"task{task}.log", "w")
        command = ["bash", str(ROOT / "example_scripts" / "slurm_rank.sh"),
                   *on_tiny(recipe, tiny_shards, recipe_data, ckpt, short=True)]  # fmt: skip
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [proc.wait(timeout=300) for proc in procs]
    assert codes == [0] * world, (tmp_path / "task0.log").read_text()[-3000:]
    rows = read_metrics(ckpt)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and "rewards/accuracies" in rows[0]
    assert any("valid.rewards/accuracies" in r for r in rows)
    assert (ckpt / "checkpoint_2" / "lora.json").is_file()


@pytest.mark.ranks
def test_the_two_site_diloco_recipe_trains(tiny_shards: Path, recipe_data: dict[str, str], tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "gemma2-2b-two-sites-diloco.yaml"
    world = yaml.safe_load(recipe.read_text())["world-size"]
    args = [*on_tiny(recipe, tiny_shards, recipe_data, tmp_path / "ckpt", short=True), "--sync-every", "2",
            "--diloco-fragments", "1"]  # fmt: skip
    assert_all_ok(launch(args, world, tmp_path))
    rows = [r for r in read_metrics(tmp_path / "ckpt") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and (tmp_path / "ckpt" / "checkpoint_2").is_dir()


def test_the_skypilot_task_names_what_exists_in_valid_bash() -> None:
    """example_scripts/skypilot.yaml cannot rot either: its recipe exists, its setup and run are
    valid bash, and every trainer flag its run passes is one the trainer knows."""
    from trainer.cli import build_parser

    task = yaml.safe_load((ROOT / "example_scripts" / "skypilot.yaml").read_text())
    assert (ROOT / task["envs"]["RECIPE"]).is_file()
    for part in ("setup", "run"):
        checked = subprocess.run(["bash", "-n"], input=task[part], text=True, capture_output=True)
        assert checked.returncode == 0, f"{part}: {checked.stderr}"
    known = {flag for action in build_parser()._actions for flag in action.option_strings}
    launch = task["run"][task["run"].index("python dist_clm_train.py") :].split("&")[0]
    passed = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", launch))
    assert passed and passed <= known, passed - known
