"""Preference-pair runs shared by the formula oracle (tests/test_preference.py) and TRL's
(tests/test_trl_oracle.py): each pipeline run is made once per test session, whichever asks first.

A pytest plugin (tests/conftest.py names it), so its session fixtures are defined once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import RankResult, assert_all_ok, bundled_texts, launch, train_args

BETA = 0.5
SIMPO_GAMMA = 0.3
PAIRS_PER_STEP = 4  # pp=2 x dp=2, --batch-size 2 pairs a replica
LORA = ("--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0")
CHUNKED = ("--loss-chunk-tokens", "16")  # the tiny vocabulary's logits stay whole under auto: chunk them


@dataclass(frozen=True)
class Run:
    ckpt: Path  # its --checkpoint-path
    results: list[RankResult]  # each rank's exit status and log

    @property
    def logs(self) -> list[str]:
        return [r.output for r in self.results]


def write_pairs(path: Path, texts: list[str], shift: int) -> Path:
    """Pairs from the corpus: a sentence's opening as the prompt, its own continuation chosen,
    another sentence's words rejected."""
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            words, other = text.split(), texts[(i + shift) % len(texts)].split()
            record = {"prompt": " ".join(words[:5]), "chosen": " " + " ".join(words[5:12]),
                      "rejected": " " + " ".join(other[2:7])}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return path


def dpo_args(shards: Path, pairs: tuple[str, str], ckpt: Path, pp: int = 2, dp: int = 2) -> list[str]:
    batch = PAIRS_PER_STEP // dp
    return [
        *train_args(shards, pairs[0], ckpt, pp=pp, dp=dp, batch=batch, micro=1, accum=1),
        "--objective", "dpo", "--dpo-beta", str(BETA), "--evaluation-data", pairs[1], "--evaluation-num-batch", "5",
    ]  # fmt: skip


def simpo_args(shards: Path, pairs: tuple[str, str], ckpt: Path) -> list[str]:
    return [
        *train_args(shards, pairs[0], ckpt, pp=2, dp=2, batch=2, micro=1, accum=1),
        "--objective", "dpo", "--dpo-beta", str(BETA), "--dpo-loss", "simpo", "--simpo-gamma", str(SIMPO_GAMMA),
        "--pp-mode", "1f1b",
    ]  # fmt: skip


def run(tmp_path_factory: pytest.TempPathFactory, name: str, args_of: object, world: int = 4) -> Run:
    """``args_of(ckpt)``'s run in a folder of its own, every rank checked to have exited 0."""
    tmp = tmp_path_factory.mktemp(name)
    results = launch(args_of(tmp / "ckpt"), world, tmp)
    assert_all_ok(results)
    return Run(tmp / "ckpt", results)


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Training pairs and evaluation pairs (files)."""
    root = tmp_path_factory.mktemp("pairs")
    texts = bundled_texts()
    return str(write_pairs(root / "train.jsonl", texts[:150], 7)), str(
        write_pairs(root / "valid.jsonl", texts[300:340], 3)
    )


@pytest.fixture(scope="session")
def dpo_run(tiny_shards: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Full fine-tuning by DPO at pp=2 x dp=2, the reference precomputed, whole logits: 10 steps,
    checkpoints at 5 and 10, evaluation at the end."""
    return run(tmp_path_factory, "dpo_run", lambda ckpt: dpo_args(tiny_shards, pairs, ckpt))


@pytest.fixture(scope="session")
def dpo_frozen_chunked_run(tiny_shards: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """As ``dpo_run`` with --dpo-reference frozen and the loss chunked."""
    extra = ("--dpo-reference", "frozen", *CHUNKED)
    return run(tmp_path_factory, "dpo_frozen_chunked", lambda ckpt: [*dpo_args(tiny_shards, pairs, ckpt), *extra])


@pytest.fixture(scope="session")
def dpo_lora_run(tiny_shards: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """DPO with LoRA (1F1B), each step's reference the stages with their adapters off, whole logits."""
    extra = (*LORA, "--pp-mode", "1f1b", "--dpo-reference", "frozen")
    return run(tmp_path_factory, "dpo_lora", lambda ckpt: [*dpo_args(tiny_shards, pairs, ckpt), *extra])


@pytest.fixture(scope="session")
def simpo_run(tiny_shards: Path, pairs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """SimPO at pp=2 x dp=2 (1F1B): no reference."""
    return run(tmp_path_factory, "simpo", lambda ckpt: simpo_args(tiny_shards, pairs, ckpt))
