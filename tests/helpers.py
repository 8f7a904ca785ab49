"""Shared test tools: tiny models, data files, rank launching and the single-process HF oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from comm.rendezvous import free_port
from tests import forked
from tests.forked import Forked

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_CORPUS = ROOT / "example_scripts" / "data" / "tiny.jsonl"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_zst(path: Path, records: list[dict], frames: int = 3) -> Path:
    """Records as zstandard-compressed jsonl in several frames (as concatenated shards are)."""
    import zstandard

    lines = [json.dumps(r) + "\n" for r in records]
    step = max(1, len(lines) // frames)
    with open(path, "wb") as f:
        for i in range(0, len(lines), step):
            f.write(zstandard.ZstdCompressor().compress("".join(lines[i : i + step]).encode()))
    return path


def tiny_gptneox(folder: Path) -> Path:
    """A tiny 5-layer GPT-NeoX HF folder (5 layers: uneven on 2 stages) with its tokenizer."""
    from convert.tiny_model import build_tiny_model

    return build_tiny_model(folder, bundled_texts(), "gptneox", num_layers=5, seed=0)


def two_task_spec(folder: Path) -> str:
    """Two jsonl tasks of the bundled stories (the second upper-cased) and their --task-name spec
    (unequal weights)."""
    texts = bundled_texts()
    a = write_jsonl(folder / "stories.jsonl", texts[:200])
    b = write_jsonl(folder / "more.jsonl", [t.upper() for t in texts[200:]])
    return f"{a}:0.7,{b}:0.3"


def instruction_records(texts: list[str]) -> list[dict]:
    """Prompt/completion records from texts: the question is context, the answer is trained on."""
    records = []
    for i, text in enumerate(texts):
        first, _, rest = text.partition(". ")
        field = ("completion", "generation", "response")[i % 3]  # every accepted name
        records.append({"prompt": f"Question: what happened after '{first}'? Answer:", field: " " + (rest or first)})
    return records


BOS = "<|begin_of_text|>"


def bos_tokenizer(texts: list[str]) -> object:
    """A tiny byte-level BPE tokenizer whose call puts BOS before every text, as Llama 3's does
    (the tiny models' own adds nothing): EOS id 0, BOS the last id."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from convert.tiny_model import EOS, train_tokenizer

    tok = train_tokenizer(texts).backend_tokenizer
    tok.add_special_tokens([BOS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS, unk_token=EOS)


def bundled_texts() -> list[str]:
    with open(BUNDLED_CORPUS) as f:
        return [json.loads(line)["text"] for line in f]


# Whether the running test may start rank processes: only a test marked ``ranks`` may, so that
# ``pytest -m "not ranks"`` (the fast inner loop) never starts one. tests/conftest.py sets it for
# each test; outside pytest (tests/golden.py, benches) anything goes.
RANKS_ALLOWED = [True]


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def start_ranks(
    args: list[str],
    ranks: range | list[int],
    logs: Path,
    port: int,
    rank_args: Callable[[int], list[str]] | None = None,
    env: dict[str, str] | None = None,
    log_name: str = "rank{}.log",
    script: tuple[str, ...] = ("dist_clm_train.py",),
    fresh: bool = False,
) -> list[subprocess.Popen | Forked]:
    """Start ``dist_clm_train.py`` once per rank (as users do) with master port ``port``, each
    rank's output appended to ``logs / log_name.format(rank)``; ``rank_args(rank)`` adds flags
    that differ between ranks (such as ``--cuda-id``); ``script`` runs another entry point (a
    script under tests/ and its own arguments) in its place. Each rank is forked from a server
    that has done the imports (tests/forked.py); ``fresh``: a new interpreter each, for tests of
    the process itself."""
    if not RANKS_ALLOWED[0]:
        pytest.fail("this test starts rank processes: mark it @pytest.mark.ranks (pytest -m 'not ranks' skips those)")
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = []
    for rank in ranks:
        argv = [*script[1:], "--rank", str(rank), "--dist-url", f"tcp://127.0.0.1:{port}", *args,
                *(rank_args(rank) if rank_args else [])]  # fmt: skip
        log = logs / log_name.format(rank)
        if not fresh:
            procs.append(forked.start(ROOT / script[0], argv, env, ROOT, log))
            continue
        with open(log, "a") as out:  # the child keeps its own handle
            cmd = [sys.executable, str(ROOT / script[0]), *argv]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def launch(
    args: list[str],
    world: int,
    tmp: Path,
    timeout: float = 300.0,
    ranks: list[int] | None = None,
    env: dict[str, str] | None = None,
    rank_args: Callable[[int], list[str]] | None = None,
) -> list[RankResult]:
    """Start every rank (``start_ranks``, logs ``tmp/rank<r>.log`` started afresh) and wait for all."""
    ranks = ranks if ranks is not None else list(range(world))
    for rank in ranks:
        (tmp / f"rank{rank}.log").write_text("")
    procs = start_ranks(args, ranks, tmp, free_port(), rank_args, env)
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [RankResult(rank, proc.returncode, (tmp / f"rank{rank}.log").read_text())
            for rank, proc in zip(ranks, procs, strict=True)]  # fmt: skip


def assert_all_ok(results: list[RankResult]) -> None:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.output[-3000:]}"


def read_metrics(checkpoint_path: Path) -> list[dict]:
    """The rows of metrics.jsonl. A live run's reporter may be half-way through writing a row:
    only lines it has finished (ended with a newline) are rows yet."""
    with open(checkpoint_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def peft_reference_model(hf_dir: Path, spec: object, seed: int) -> torch.nn.Module:
    """HF's model wrapped by PEFT itself, its adapters started as our stages start theirs."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from modules import family_for, layer_part
    from modules.lora import hf_block_path, init_adapters

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")
    family = family_for(model.config.model_type)
    model = get_peft_model(model, spec.peft_config(model))
    for i in range(model.config.num_hidden_layers):
        init_adapters(model.base_model.model.get_submodule(hf_block_path(family, i)), seed, layer_part(i))
    return model


_ORACLE_RUNS: dict[tuple, tuple[list[float], list[float], dict[str, torch.Tensor]]] = {}


def hf_reference_training(
    hf_dir: Path, task_spec: str, seq_length: int, seed: int, per_step: int, steps: int,
    lr: float, warmup: int, max_grad_norm: float = 1.0, lora: object = None, autocast: torch.dtype | None = None,
    packing: str | None = None,
) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:  # fmt: skip
    """``_hf_reference_training``, computed once per test session for the same arguments (several
    runs of other schedules or topologies are compared with the same oracle); treat it as read-only."""
    key = (
        str(hf_dir),
        task_spec,
        seq_length,
        seed,
        per_step,
        steps,
        lr,
        warmup,
        max_grad_norm,
        lora,
        autocast,
        packing,
    )
    if key not in _ORACLE_RUNS:
        _ORACLE_RUNS[key] = _hf_reference_training(*key[:9], lora=lora, autocast=autocast, packing=packing)
    losses, norms, state = _ORACLE_RUNS[key]
    return list(losses), list(norms), state


def _hf_reference_training(
    hf_dir: Path, task_spec: str, seq_length: int, seed: int, per_step: int, steps: int,
    lr: float, warmup: int, max_grad_norm: float = 1.0, lora: object = None, autocast: torch.dtype | None = None,
    packing: str | None = None,
) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:  # fmt: skip
    """Train HF's own model in one process on the same global batches; the oracle for every test.

    With ``lora`` (a resolved ``LoraSpec``) the model is PEFT's LoRA model of it, and only the
    adapters train. With ``autocast`` (bf16/fp16) the forward and loss run under CPU autocast
    over fp32 weights, as ``--bf16``/``--fp16`` do. Returns the loss and the (pre-clipping)
    gradient norm of every step, and the final weights (with LoRA: the adapters, as PEFT saves them).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from modules import attention_implementation
    from pipeline.chain import exact_norm

    torch.manual_seed(0)
    if lora is None:
        config = AutoConfig.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation=attention_implementation(config))
    else:
        model = peft_reference_model(hf_dir, lora, seed)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]

    def loss_of(batch: object) -> torch.Tensor:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            # restarting positions: HF's own mask builder keeps packed examples apart (it looks for
            # them only without a cache, so use_cache=False, as a training forward runs)
            positions = batch.positions()
            return model(input_ids=batch.input_ids, labels=batch.labels, position_ids=positions, use_cache=False).loss

    def clip(limit: float) -> torch.Tensor:
        """HF's own clipping; the norm reported is the exact one (float64), as the trainer's is:
        torch's fp32 norm of a real model's gradients is off by a few 1e-5."""
        norm = exact_norm([p.grad for p in trained])
        torch.nn.utils.clip_grad_norm_(trained, limit)
        return norm

    schedule = (hf_dir, task_spec, seq_length, seed, per_step, steps, lr, warmup, max_grad_norm, packing)
    losses, norms = _train_in_process(trained, loss_of, clip, *schedule)
    if lora is not None:
        from peft import get_peft_model_state_dict

        return losses, norms, {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_in_process(
    trained: list[torch.nn.Parameter], loss_of: Callable, clip: Callable, data_dir: Path, task_spec: str,
    seq_length: int, seed: int, per_step: int, steps: int, lr: float, warmup: int, max_grad_norm: float,
    packing: str | None = None, pairs: bool = False,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """The oracle's loop: the run's global batches in order, AdamW, linear warm-up and decay, and
    clipping; ``loss_of(batch)`` is the model's mean loss, ``clip(limit)`` clips and returns the
    norm before clipping. ``pairs``: the data are preference pairs (``per_step`` sequences)."""
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from data.stream import TokenStream, parse_task_names

    tokenizer = AutoTokenizer.from_pretrained(data_dir)
    stream = TokenStream(parse_task_names(task_spec), tokenizer, seq_length, seed, packing=packing, pairs=pairs)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    losses, norms = [], []
    for _ in range(steps):
        loss = loss_of(stream.next_batch(per_step))
        loss.backward()
        norms.append(clip(max_grad_norm if max_grad_norm > 0 else float("inf")).item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, norms


def chained_training(
    shards: Path, splits: list[range], task_spec: str, per_step: int, steps: int, max_grad_norm: float = 1.0
) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Our stages of ``shards`` (``splits``: each stage's layers) chained in one process and
    trained by the oracle's loop with the trainer's loss: losses, norms, final HF-named weights."""
    from modules import family_for, load_config
    from objectives.loss import token_loss
    from pipeline.chain import StageChain

    config = load_config(shards)
    chain = StageChain(family_for(config.model_type), config, splits)
    chain.load(str(shards))
    chain.train()

    def loss_of(batch: object) -> torch.Tensor:
        return token_loss(chain(batch.input_ids, batch.positions()), batch.labels, batch.loss_tokens())

    def clip(limit: float) -> torch.Tensor:
        chain.sum_tied_grads()
        return chain.clip_grads(limit)

    trained = [p for p in chain.parameters() if p.requires_grad]
    schedule = (shards, task_spec, SEQ, SEED, per_step, steps, LR, WARMUP, max_grad_norm)
    losses, norms = _train_in_process(trained, loss_of, clip, *schedule)
    return losses, norms, {k: v.detach().clone() for k, v in chain.hf_state().items()}


def saved_adapters(step_dir: Path) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapters under the names PEFT's model of HF's gives them."""
    from safetensors.torch import load_file

    from modules import family_for, layer_part, load_config
    from modules.lora import adapter_part, hf_block_path

    config = load_config(step_dir)
    family = family_for(config.model_type)
    adapters = {}
    for i in range(config.num_hidden_layers):
        for key, value in load_file(step_dir / f"{adapter_part(layer_part(i))}.safetensors").items():
            adapters[f"base_model.model.{hf_block_path(family, i)}.{key}"] = value
    return adapters


def load_hf_state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# One recipe for every multi-process comparison: 10 steps, lr high enough that clipping acts.
STEPS, SEQ, LR, WARMUP, SEED = 10, 32, 2e-3, 2, 7
LOSS_ATOL = 1e-5  # measured: fp32 pipelines agree with the reference to ~1e-6 over 10 steps
WEIGHT_ATOL = 1e-5


def train_args(shards: Path, tasks: str, ckpt: Path, pp: int, dp: int, batch: int, micro: int, accum: int) -> list[str]:
    return [
        "--model-name", str(shards), "--task-name", tasks, "--seq-length", str(SEQ), "--seed", str(SEED),
        "--pipeline-group-size", str(pp), "--data-group-size", str(dp), "--world-size", str(pp * dp),
        "--batch-size", str(batch), "--micro-batch-size", str(micro), "--gradient-accumulate-step", str(accum),
        "--lr", str(LR), "--warmup-steps", str(WARMUP), "--total-steps", str(STEPS),
        "--checkpoint-path", str(ckpt), "--checkpoint-steps", "5",
    ]  # fmt: skip


def assert_same_state(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = WEIGHT_ATOL
) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=atol, rtol=0, msg=lambda msg, key=key: f"{key}: {msg}")


def compare_to_reference(hf_dir: Path, tasks: str, ckpt: Path, per_step: int, tmp_path: Path) -> dict:
    """Losses, gradient norms and final weights of a finished run equal the HF oracle's."""
    from convert.to_hf import convert_to_hf

    ref_losses, ref_norms, ref_state = hf_reference_training(hf_dir, tasks, SEQ, SEED, per_step, STEPS, LR, WARMUP)
    rows = [r for r in read_metrics(ckpt) if "loss" in r]  # training rows
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ours = [r["loss"] for r in rows]
    assert ours == pytest.approx(ref_losses, abs=LOSS_ATOL, rel=0)
    assert ours[-1] < ours[0]  # it learns: the comparison is not between two frozen models
    # the clipping norm spans every stage and replica, as the single model's does
    assert [r["grad_norm"] for r in rows] == pytest.approx(ref_norms, rel=1e-5)
    assert max(ref_norms) > 1.0  # so clipping at 1.0 really acted
    state = load_hf_state(convert_to_hf(ckpt, tmp_path / "hf"))
    assert_same_state(state, ref_state)
    return state


def resume_elsewhere(
    shards: Path, tasks: str, ckpt: Path, final_state: dict, tmp: Path, extra: tuple[str, ...] = ()
) -> None:
    """Resume the step-5 checkpoint of ``ckpt`` in one process (with the run's ``extra`` flags);
    it must end where the run ended: the same losses and the same final HF weights."""
    import shutil

    from convert.to_hf import convert_to_hf

    tmp.mkdir()
    shutil.copytree(ckpt / "checkpoint_5", tmp / "ckpt" / "checkpoint_5")
    (tmp / "ckpt" / "latest").write_text("5\n")
    args = train_args(shards, tasks, tmp / "ckpt", pp=1, dp=1, batch=4, micro=4, accum=1)
    assert_all_ok(launch([*args, *extra], 1, tmp))
    rows = [r for r in read_metrics(tmp / "ckpt") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(6, STEPS + 1))
    expected = [r["loss"] for r in read_metrics(ckpt) if "loss" in r][5:]
    assert [r["loss"] for r in rows] == pytest.approx(expected, abs=LOSS_ATOL, rel=0)
    assert_same_state(load_hf_state(convert_to_hf(tmp / "ckpt", tmp / "hf")), final_state)


def store_client(port: int) -> dist.TCPStore:
    """Another client of the store ``store`` (tests/conftest.py) serves, as a second rank has."""
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
