from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from tests import helpers
from tests.helpers import (
    OFFLINE_ENV,
    assert_all_ok,
    bundled_texts,
    free_port,
    instruction_records,
    launch,
    tiny_gptneox,
    two_task_spec,
    write_jsonl,
    write_zst,
)
from tests.pp2_dp2 import elastic_args, evaluation_flags

os.environ.update(OFFLINE_ENV)
# the preference runs, shared by the formula's oracle and TRL's: session fixtures defined once
pytest_plugins = ["tests.preference_runs"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Only a test marked ``ranks`` may start rank processes (tests.helpers.start_ranks checks),
    its fixtures' included: then ``-m "not ranks"`` runs no rank at all."""
    helpers.RANKS_ALLOWED[0] = item.get_closest_marker("ranks") is not None


def pytest_runtest_teardown(item: pytest.Item) -> None:
    helpers.RANKS_ALLOWED[0] = True


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 5-layer GPT-NeoX HF folder (5 layers: uneven on 2 stages) with its tokenizer."""
    return tiny_gptneox(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def tiny_shards(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from convert.from_hf import convert_from_hf

    return convert_from_hf(tiny_hf, tmp_path_factory.mktemp("tiny") / "shards")


@pytest.fixture(scope="session")
def two_tasks(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two jsonl tasks and their --task-name spec (unequal weights)."""
    return two_task_spec(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def short_tasks(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Clauses (a few to a dozen tokens each) as text, and short questions with answers:
    several examples fit in a sequence, so documents packing restarts positions inside it."""
    root = tmp_path_factory.mktemp("short")
    clauses = [c.strip() for text in bundled_texts() for c in re.split(r"[,.;] ", text) if len(c.strip()) > 8]
    text = write_jsonl(root / "clauses.jsonl", clauses[:1000])
    qa = write_zst(root / "qa.jsonl.zst", [{"prompt": f"{c[:8]}?", "completion": " " + c[8:30]}
                                           for c in clauses[1000:1500]])  # fmt: skip
    return f"{text}:0.6,{qa}:0.4"


@pytest.fixture(scope="session")
def mixed_tasks(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Plain text (jsonl) mixed with instruction data (jsonl.zst, loss on completions only)."""
    root = tmp_path_factory.mktemp("mixed")
    text = write_jsonl(root / "stories.jsonl", bundled_texts()[:200])
    instructions = write_zst(root / "qa.jsonl.zst", instruction_records(bundled_texts()[200:]))
    return f"{text}:0.6,{instructions}:0.4"


@pytest.fixture(scope="session")
def pp2_dp2_run(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted pp=2 x dp=2 run (tests/pp2_dp2.py): the oracle of the runs that lose,
    preempt or take in ranks on the way; made once for all of them."""
    tmp = tmp_path_factory.mktemp("pp2_dp2_run")
    assert_all_ok(launch(elastic_args(tiny_shards, two_tasks, tmp / "ckpt"), 4, tmp))
    return tmp / "ckpt"


@pytest.fixture(scope="session")
def pp2_dp2_evaluated_run(tiny_shards: Path, two_tasks: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted pp=2 x dp=2 run with evaluations (tests/pp2_dp2.evaluation_flags): the
    oracle of runs that lose a rank during one. No emulated latency: it delays the same sums."""
    tmp = tmp_path_factory.mktemp("pp2_dp2_evaluated_run")
    assert_all_ok(launch(elastic_args(tiny_shards, two_tasks, tmp / "ckpt", *evaluation_flags(two_tasks)), 4, tmp))
    return tmp / "ckpt"


@pytest.fixture
def store() -> tuple[dist.TCPStore, int]:
    """A store of its own on a free port, and the port: for the agreements made through it
    (admission, elastic membership, spares) tested in one process with no process group."""
    port = free_port()
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)), port
