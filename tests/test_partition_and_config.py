"""Layer split, flag checking and topology: pure functions, no processes."""

from __future__ import annotations

import copy
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest
import torch

from comm.topology import Topology
from modules import family_for
from pipeline.partition import PartWeights, split_layers
from trainer.cli import build_parser, config_from_args
from trainer.config import PER_RANK, OptimConfig, RunConfig

# --- pipeline.partition -----------------------------------------------------------------------


def test_uneven_split_gives_the_extra_layer_to_the_first_stage() -> None:
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]


@pytest.mark.parametrize(("layers", "stages"), [(4, 2), (6, 3), (5, 1), (5, 5), (24, 4)])
def test_even_split_covers_every_layer_once(layers: int, stages: int) -> None:
    split = split_layers(layers, stages)
    assert len(split) == stages
    assert all(len(r) == layers // stages for r in split)
    assert [i for r in split for i in r] == list(range(layers))


@pytest.mark.parametrize(("layers", "stages"), [(5, 2), (7, 3), (10, 4), (3, 3), (9, 2)])
def test_split_is_consecutive_and_balanced(layers: int, stages: int) -> None:
    split = split_layers(layers, stages)
    assert [i for r in split for i in r] == list(range(layers))
    sizes = [len(r) for r in split]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_more_stages_than_layers_names_the_layer_count() -> None:
    with pytest.raises(ValueError, match="only 5 layers") as exc:
        split_layers(5, 6)
    assert "--pipeline-group-size 5" in str(exc.value)


def test_layers_per_stage_must_multiply_to_the_total() -> None:
    assert split_layers(6, 2, layers_per_stage=3) == [range(0, 3), range(3, 6)]
    with pytest.raises(ValueError, match="--num-layers 2") as exc:
        split_layers(5, 2, layers_per_stage=2)
    assert "5 layers" in str(exc.value)
    with pytest.raises(ValueError, match="--num-layers"):
        split_layers(5, 2, layers_per_stage=3)


TASKS = str(Path(__file__).resolve().parent.parent / "example_scripts" / "data" / "tiny.jsonl")


def heavy_head_costs(pp: int, *flags: str) -> tuple[object, PartWeights, list[PartWeights]]:
    """A GPT-NeoX whose head outweighs many blocks (vocabulary 50k, hidden 256, 8 layers)."""
    from convert.tiny_model import tiny_config
    from trainer.startup import stage_costs

    config = tiny_config("gptneox", 50_000, num_layers=8, hidden=256, heads=8)
    args = ["--model-name", "m", "--task-name", TASKS, "--rank", "0", "--world-size", str(pp),
            "--pipeline-group-size", str(pp), "--seq-length", "128", *flags]  # fmt: skip
    compute, memory = stage_costs(config_from_args(build_parser().parse_args(args)), family_for("gptneox"), config)
    return config, compute, memory


def test_default_split_balances_compute_not_parameters() -> None:
    """The embedding's lookup is nearly free while the head's projection costs vocab x hidden
    per token: by parameters the 8 layers split 4/4, by compute the head's stage keeps one."""
    from trainer.startup import part_sizes

    config, compute, _memory = heavy_head_costs(2)
    by_parameters = split_layers(8, 2, cost=PartWeights(*part_sizes(family_for("gptneox"), config)))
    assert [len(r) for r in by_parameters] == [4, 4]
    assert [len(r) for r in split_layers(8, 2, cost=compute)] == [7, 1]
    assert [len(r) for r in split_layers(8, 4, cost=heavy_head_costs(4)[1])] == [5, 1, 1, 1]
    # chunking the loss projects the logits twice: the head weighs more still; LoRA drops the
    # weight gradient of every frozen linear layer alike
    assert heavy_head_costs(2, "--loss-chunk-tokens", "64")[1].head > compute.head
    assert heavy_head_costs(2, "--activation-checkpointing", "full")[1].layer > compute.layer
    assert split_layers(8, 2, layers_per_stage=(2, 6), cost=compute) == [range(0, 2), range(2, 8)]  # the flag wins


def test_split_keeps_each_stage_within_its_memory(caplog: pytest.LogCaptureFixture) -> None:
    _config, compute, memory = heavy_head_costs(2, "--pp-mode", "1f1b")
    used = [memory[0].of_stage(0, 2, n) for n in range(1, 8)]
    assert memory[0].layer > memory[1].layer  # 1F1B: stage 0 holds two micro-batches, stage 1 one
    # stage 0 may hold 5 layers but not 6: the cheapest split that fits
    limits = [used[4] + 1, float("inf")]
    assert [len(r) for r in split_layers(8, 2, cost=compute, memory=memory, limits=limits)] == [5, 3]
    # nothing fits: split by compute, and say so
    with caplog.at_level("WARNING"):
        split = split_layers(8, 2, cost=compute, memory=memory, limits=[1.0, 1.0])
    assert [len(r) for r in split] == [7, 1] and "no split of 8 layers over 2 stages fits" in caplog.text


def test_stage_memory_is_the_least_of_its_ranks_with_hosts_shared() -> None:
    from trainer.startup import stage_memory_limits

    class Gathered:
        topo = Topology(0, 2, 2)  # ranks 0, 2: stage 0; ranks 1, 3: stage 1

        def all_gather_object(self, own: object) -> list[object]:
            # ranks 0 and 1 share one host's 64 GB on the CPU; 2 and 3 have a GPU each
            return [("a", "cpu", 64e9), ("a", "cpu", 64e9), ("b", "cuda:0", 80e9), ("b", "cuda:1", 24e9)]

    assert stage_memory_limits(Gathered(), torch.device("cpu")) == [32e9, 24e9]


# --- trainer.cli ------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def parse(two_tasks: str, *extra: str) -> object:
    args = ["--model-name", "unused-model-dir", "--task-name", two_tasks, "--use-cuda", "false", *extra]
    return config_from_args(build_parser().parse_args(args))


def test_flags_build_the_configs(two_tasks: str, clean_env: pytest.MonkeyPatch) -> None:
    cfg = parse(
        two_tasks, "--rank", "3", "--pipeline-group-size", "2", "--data-group-size", "2", "--world-size", "4",
        "--batch-size", "4", "--micro-batch-size", "2", "--model-type", "gpt-neox", "--comm-timeout", "7",
    )  # fmt: skip
    assert (cfg.topology.rank, cfg.topology.stage, cfg.topology.replica) == (3, 1, 1)
    assert cfg.batch.micro_batches == 2
    assert cfg.model.model_type == "gptneox"
    assert cfg.model.tokenizer_name == "unused-model-dir"
    assert cfg.comm.timeout_s == 7 and cfg.comm.backend == "gloo"
    assert [t.weight for t in cfg.data.tasks] == pytest.approx([0.7, 0.3])
    assert cfg.device == "cpu"


def changed(cfg: RunConfig, config: str, name: str, value: object) -> RunConfig:
    """``cfg`` with one field of one of its configs (``run``: its own) set to ``value``, unchecked."""
    cfg = copy.deepcopy(cfg)
    owner = cfg if config == "run" else getattr(cfg, config)
    object.__setattr__(owner, name, value)
    return cfg


# what the fingerprint reads through a rule of its own (tested below), not as the value
READ_AS_USED = {("data", "tasks"), ("evaluation", "path"), ("dp", "bucket_mb")}


def test_the_fingerprint_holds_every_setting_but_the_per_rank_ones(
    two_tasks: str, clean_env: pytest.MonkeyPatch
) -> None:
    """Every field of every config, set to another value, changes the settings' fingerprint
    unless PER_RANK lists it: a setting added to a config is shared by default, not forgotten."""
    cfg = parse(two_tasks, "--rank", "0", "--pipeline-group-size", "2", "--world-size", "2", "--lora-rank", "4")
    base = cfg.fingerprint()
    checked = 0
    for field in fields(cfg):
        owner = getattr(cfg, field.name)
        config, names = (field.name, [f.name for f in fields(owner)]) if is_dataclass(owner) else ("run", [field.name])
        for name in names:
            if (config, name) in READ_AS_USED:
                continue
            moved = changed(cfg, config, name, "another value").fingerprint()
            per_rank = name in PER_RANK.get(config, ())
            assert (moved == base) == per_rank, f"{config}.{name}: per rank {per_rank}, yet the fingerprint disagrees"
            checked += 1
    assert checked > 60
    # paths are per rank, what they hold is not: the tasks' weights, whether evaluation data exists
    tasks = cfg.data.tasks
    assert changed(cfg, "data", "tasks", tuple(replace(t, path=Path("elsewhere")) for t in tasks)).fingerprint() == base
    assert changed(cfg, "data", "tasks", tuple(replace(t, weight=0.5) for t in tasks)).fingerprint() != base
    assert changed(cfg, "evaluation", "path", Path("held-out.jsonl")).fingerprint() != base


def test_world_size_must_equal_pp_times_dp(two_tasks: str, clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--world-size 3") as exc:
        parse(two_tasks, "--rank", "0", "--pipeline-group-size", "2", "--world-size", "3")
    assert "--pipeline-group-size 2" in str(exc.value)


def test_world_size_from_the_environment_is_checked(two_tasks: str, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORLD_SIZE", "4")  # torchrun's count: the pipelines' ranks and any spares
    with pytest.raises(
        ValueError, match=r"\$WORLD_SIZE 4 != --pipeline-group-size 2 x --data-group-size 1 \+ --spares 0"
    ):
        parse(two_tasks, "--rank", "0", "--pipeline-group-size", "2")


def test_batch_must_divide_into_micro_batches(two_tasks: str, clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--micro-batch-size 3"):
        parse(two_tasks, "--rank", "0", "--batch-size", "4", "--micro-batch-size", "3")


@pytest.mark.parametrize("rank", ["2", "-1", "7"])
def test_rank_outside_the_world(two_tasks: str, clean_env: pytest.MonkeyPatch, rank: str) -> None:
    with pytest.raises(ValueError, match=f"--rank {rank} is outside 0..1"):
        parse(two_tasks, "--rank", rank, "--pipeline-group-size", "2", "--world-size", "2")


def test_missing_rank_without_env(two_tasks: str, clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--rank"):
        parse(two_tasks)


def test_rank_comes_from_the_environment(two_tasks: str, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "1")
    assert parse(two_tasks, "--pipeline-group-size", "2").topology.rank == 1


def test_unknown_model_type_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="unsupported model type 'bloom'") as exc:
        family_for("bloom")
    assert "gpt_neox" in str(exc.value) and "qwen2" in str(exc.value)
    assert "--model-type" not in str(exc.value)  # naming another family cannot make it compute
    assert family_for("gpt_neox") is family_for("gptneox")


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (2, 10), (3, 7), (10, 10), (1, 1), (5, 1000)])
def test_lr_schedule_matches_transformers(warmup: int, total: int) -> None:
    from transformers import get_linear_schedule_with_warmup

    lr = 3e-4
    optim = OptimConfig(lr=lr, total_steps=total, warmup_steps=warmup)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    for step in range(1, total + 1):  # 1-based optimizer steps, as the trainer counts them
        want = optimizer.param_groups[0]["lr"]
        assert optim.lr_at(step) == pytest.approx(want, rel=1e-12, abs=1e-18), f"step {step}"
        optimizer.step()
        scheduler.step()


def test_lr_schedule_shape() -> None:
    optim = OptimConfig(lr=1.0, total_steps=10, warmup_steps=2)
    assert [optim.lr_at(s) for s in (1, 2, 3, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.125])


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"total_steps": 0}, "--total-steps"),
        ({"total_steps": 5, "warmup_steps": 6}, "--warmup-steps"),
        ({"total_steps": 5, "lr": 0.0}, "--lr"),
        ({"total_steps": 5, "max_grad_norm": -1.0}, "--max-grad-norm"),
    ],
)
def test_optim_config_names_the_bad_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        OptimConfig(**{"lr": 1e-3, **kwargs})


def test_task_errors_surface_through_the_flags(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        parse(str(missing), "--rank", "0")


# --- comm.topology ----------------------------------------------------------------------------


def test_topology_grid_pp2_dp3() -> None:
    placements = {}
    for rank in range(6):
        topo = Topology(rank, pipeline_size=2, data_size=3)
        assert topo.world_size == 6
        placements[rank] = (topo.stage, topo.replica)
        assert topo.rank_of(topo.stage, topo.replica) == rank
        assert topo.is_first_stage == (topo.stage == 0) and topo.is_last_stage == (topo.stage == 1)
        assert topo.describe(rank) == f"rank {rank} (stage {topo.stage}, replica {topo.replica})"
    assert placements == {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1), 4: (0, 2), 5: (1, 2)}

    topo = Topology(0, pipeline_size=2, data_size=3)
    # pipeline groups are contiguous ranks, data-parallel groups strided by pp
    assert [topo.pipeline_ranks(r) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [topo.data_ranks(s) for s in range(2)] == [[0, 2, 4], [1, 3, 5]]


@pytest.mark.parametrize(("pp", "dp"), [(2, 3), (3, 2), (4, 1), (1, 4)])
def test_every_rank_is_in_one_pipeline_and_one_data_group(pp: int, dp: int) -> None:
    topo = Topology(0, pp, dp)
    pipelines = [topo.pipeline_ranks(r) for r in range(dp)]
    data = [topo.data_ranks(s) for s in range(pp)]
    assert sorted(r for g in pipelines for r in g) == list(range(pp * dp))
    assert sorted(r for g in data for r in g) == list(range(pp * dp))
    for rank in range(pp * dp):
        me = Topology(rank, pp, dp)
        assert rank in pipelines[me.replica] and rank in data[me.stage]
        assert set(pipelines[me.replica]) & set(data[me.stage]) == {rank}


@pytest.mark.parametrize(("pp", "dp"), [(0, 1), (1, 0)])
def test_topology_sizes_must_be_positive(pp: int, dp: int) -> None:
    with pytest.raises(ValueError, match="--pipeline-group-size and --data-group-size"):
        Topology(0, pp, dp)


def test_help_states_each_default() -> None:
    """--help shows every flag's default: a value, or where it is worked out (None) said in words."""
    import re

    from trainer.cli import build_parser

    parser = build_parser()
    blocks = re.split(r"\n  (?=-)", parser.format_help())  # one block per option, its help folded inside
    by_flag = {block.split()[0].rstrip(","): " ".join(block.split()) for block in blocks if block.startswith("-")}
    for flag, shown in (("--lr", "1e-05"), ("--seq-length", "2048"), ("--total-steps", "1000"),
                        ("--warmup-steps", "0"), ("--checkpoint-path", "model_checkpoints")):  # fmt: skip
        assert f"(default: {shown})" in by_flag[flag], by_flag[flag]
    for action in parser._actions:
        flag = action.option_strings[0] if action.option_strings else None
        if flag and flag != "-h" and action.default is not None and action.default is not False:
            assert "default" in by_flag[flag], by_flag[flag]
