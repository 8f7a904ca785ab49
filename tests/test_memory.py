"""Memory tools: activation recomputation gives the same gradients and really recomputes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convert.tiny_model import tiny_config
from data.stream import IGNORE_INDEX
from modules import family_for, init_weights
from modules.common import soft_cap
from objectives.loss import chunked_token_loss, token_loss
from pipeline.stage import Stage
from tests.helpers import ROOT, assert_all_ok, launch, read_metrics, train_args

VOCAB = 384


def two_stages(family: str, recompute: bool, dropout: float) -> tuple[Stage, Stage, object]:
    config = tiny_config(family, VOCAB, num_layers=4)
    for name in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, dropout)
    fam = family_for(family)
    first = Stage(fam, config, range(0, 2), is_first=True, is_last=False, recompute=recompute)
    last = Stage(fam, config, range(2, 4), is_first=False, is_last=True, recompute=recompute)
    for stage in (first, last):
        stage.init_parts(0.02, seed=5)
        stage.train()
    return first, last, config


def gradients(family: str, recompute: bool, dropout: float) -> dict[str, torch.Tensor]:
    """Every parameter's gradient and the gradient crossing the stage boundary, for one step of
    two chained stages (the second receives the first's output as a pipeline stage does)."""
    first, last, _ = two_stages(family, recompute, dropout)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # dropout masks: the same draws in both runs
    hidden = first(ids)
    received = hidden.detach().requires_grad_(True)
    logits = last(received)
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    hidden.backward(received.grad)
    grads = {f"first.{n}": p.grad for n, p in first.named_parameters()}
    grads |= {f"last.{n}": p.grad for n, p in last.named_parameters()}
    return grads | {"boundary": received.grad}


@pytest.mark.parametrize("family", ["gptneox", "gptj", "llama", "gpt2"])  # llama and gpt2 are tied
def test_recomputation_gives_identical_gradients(family: str) -> None:
    dropout = 0.1 if family in ("gptneox", "gpt2") else 0.0  # recomputed dropout must redraw the same masks
    plain, recomputed = gradients(family, False, dropout), gradients(family, True, dropout)
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        assert grad is not None and torch.equal(grad, recomputed[name]), name
    if dropout:  # the masks mattered: without dropout the gradients differ
        assert not torch.equal(plain["boundary"], gradients(family, False, 0.0)["boundary"])


def test_recomputation_runs_each_block_again_in_the_backward() -> None:
    for recompute, expected in ((False, 1), (True, 2)):
        first, _, _ = two_stages("gptneox", recompute, 0.0)
        calls = {i: 0 for i in first.layer_ids}
        for i in first.layer_ids:
            # a pre-hook: the recomputation stops as soon as it has what the backward needs
            first.layers[str(i)].register_forward_pre_hook(lambda *_, i=i, calls=calls: calls.update({i: calls[i] + 1}))
        first(torch.randint(0, VOCAB, (1, 16))).sum().backward()
        assert calls == {i: expected for i in first.layer_ids}
        with torch.no_grad():  # evaluation never recomputes
            first(torch.randint(0, VOCAB, (1, 16)))
        assert calls == {i: expected + 1 for i in first.layer_ids}


@pytest.mark.ranks
def test_recomputed_pipeline_trains_as_the_plain_one(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    """pp=2, 1F1B, 10 steps: the flag reaches every stage and changes no loss (bit for bit);
    every row reports each stage's peak memory."""
    losses = {}
    for mode in ("none", "full"):
        ckpt = tmp_path / mode
        args = train_args(tiny_shards, two_tasks, ckpt, pp=2, dp=1, batch=4, micro=1, accum=1)
        assert_all_ok(launch([*args, "--pp-mode", "1f1b", "--activation-checkpointing", mode], 2, tmp_path))
        rows = [r for r in read_metrics(ckpt) if "loss" in r]
        losses[mode] = [r["loss"] for r in rows]
        for row in rows:
            stages = [row["peak_mem_bytes_stage0"], row["peak_mem_bytes_stage1"]]
            assert min(stages) > 50e6 and row["peak_mem_bytes"] == max(stages)  # a process with torch loaded
    assert len(losses["none"]) == 10 and losses["none"] == losses["full"]


_PEAK_WINDOW = """
import json, torch
from trainer.memory import PeakMemory
memory = PeakMemory(torch.device("cpu"))
memory.reset()
before = memory.peak_bytes()
big = torch.ones(50_000_000)  # 200 MB, every page touched
del big
high = memory.peak_bytes()
memory.reset()  # freed memory went back to the system: the new window starts low again
print(json.dumps([before, high, memory.peak_bytes()]))
"""


def test_peak_memory_window_resets() -> None:
    # A fresh process: in this one, earlier tests leave freed memory that malloc hands out again
    # without the resident set growing.
    done = subprocess.run([sys.executable, "-c", _PEAK_WINDOW], cwd=ROOT, capture_output=True, text=True, check=True)
    before, high, after = json.loads(done.stdout.splitlines()[-1])
    assert high - before >= 190e6
    assert after < high - 150e6


@pytest.mark.parametrize("family", ["gptneox", "gptj", "llama", "gpt2"])
def test_stage_built_on_meta_is_initialised_everywhere(family: str) -> None:
    """A stage's parts get uninitialised memory; init_parts must then write every value. The
    same pieces built the ordinary way (HF's own initialisation first) and given init_parts
    must come out equal: a value it skipped would differ."""
    config = tiny_config(family, VOCAB, num_layers=3)
    fam = family_for(family)
    stage = Stage(fam, config, range(3), is_first=True, is_last=True)
    stage.init_parts(0.02, seed=9)
    for part, module in stage.parts().items():
        kind = fam.embedding(config) if part == "embs" else fam.head(config) if part == "lm_head" else None
        ordinary = kind if kind is not None else fam.block(config, int(part.removeprefix("layer_")))
        init_weights(ordinary, 0.02, 9, part)
        if part == "lm_head" and stage.tied_keys:
            continue  # the tied output weight is the embedding's: checked there
        expected = ordinary.state_dict()
        assert module.state_dict().keys() == expected.keys(), part
        for key, value in expected.items():
            assert torch.equal(module.state_dict()[key], value), f"{part}/{key}"


# -- the loss without the vocabulary-sized logits -----------------------------------------------


def loss_and_grads(
    chunk: int, bias: bool, frozen: bool, autocast: torch.dtype | None = None, softcap: float | None = None
) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    output = nn.Linear(16, 50, bias=bias)
    output.weight.requires_grad_(not frozen)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, 2:5] = IGNORE_INDEX  # prompt tokens: not trained
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        if chunk:
            loss = chunked_token_loss(hidden, output, labels, normalizer=7.0, chunk=chunk, softcap=softcap)
        else:
            loss = token_loss(soft_cap(output(hidden), softcap), labels, normalizer=7.0)
    loss.backward()
    grads = {"loss": loss.detach(), "hidden": hidden.grad, "weight": output.weight.grad}
    return grads | ({"bias": output.bias.grad} if bias else {})


@pytest.mark.parametrize("chunk", [1, 5, 24, 1000])
@pytest.mark.parametrize(("bias", "frozen"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("softcap", [None, 0.5])  # Gemma 2's final soft-capping (0.5: most logits bent)
def test_chunked_loss_equals_the_plain_one(chunk: int, bias: bool, frozen: bool, softcap: float | None) -> None:
    plain = loss_and_grads(0, bias, frozen, softcap=softcap)
    chunked = loss_and_grads(chunk, bias, frozen, softcap=softcap)
    if softcap is not None:  # the cap really changed the loss: it is not ignored on either side
        assert not torch.allclose(loss_and_grads(0, bias, frozen)["loss"], plain["loss"])
    assert plain.keys() == chunked.keys()
    for name, value in plain.items():
        if value is None:  # a frozen output layer gets no gradient either way
            assert chunked[name] is None, name
            continue
        torch.testing.assert_close(chunked[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_loss_is_exact_on_confident_tokens() -> None:
    """Logits of 20-40 with the target on top (a trained model on text it knows): the loss and
    its gradients stay as exact as autograd's log_softmax, where logsumexp - logit rounds the
    small differences of large numbers away (measured on SmolLM2: gradient norm off by 2.5e-5)."""
    torch.manual_seed(3)
    hidden = torch.randn(2, 33, 16)
    output = nn.Linear(16, 300, bias=False)
    with torch.no_grad():
        output.weight.mul_(60.0)
        labels = output(hidden).argmax(-1).roll(1, dims=1)  # position t's top logit is token t+1
    results = []
    for chunk in (0, 7):
        h = hidden.clone().requires_grad_(True)
        output.zero_grad()
        if chunk:
            loss = chunked_token_loss(h, output, labels, normalizer=64.0, chunk=chunk)
        else:
            loss = token_loss(output(h), labels, normalizer=64.0)
        loss.backward()
        results.append((loss.detach(), h.grad, output.weight.grad.clone()))
    (plain_loss, *plain), (chunked_loss, *chunked) = results
    assert plain_loss < 0.1  # confident: the loss is the small difference the old form lost
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-6, atol=0)
    for ours, reference in zip(chunked, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-9)


def test_chunked_loss_under_bf16_autocast_stays_close() -> None:
    plain, chunked = loss_and_grads(0, True, False, torch.bfloat16), loss_and_grads(5, True, False, torch.bfloat16)
    for name, value in plain.items():
        torch.testing.assert_close(chunked[name], value, atol=2e-2, rtol=2e-2, msg=name)  # bf16's 3 digits


def test_chunked_loss_keeps_no_logits_for_the_backward() -> None:
    """What the loss keeps for the backward, beyond the parameters: nothing of tokens x vocab."""
    hidden = torch.randn(2, 64, 16, requires_grad=True)
    output = nn.Linear(16, 500, bias=False)
    labels = torch.randint(0, 500, (2, 64))
    params = {output.weight.data_ptr()}
    for chunk, holds_logits in ((0, True), (32, False)):
        kept = []
        pack = lambda t, kept=kept: kept.append(t.numel() if t.data_ptr() not in params else 0) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if chunk:
                chunked_token_loss(hidden, output, labels, 1.0, chunk)
            else:
                token_loss(output(hidden), labels, 1.0)
        assert (max(kept) >= 2 * 63 * 500) == holds_logits, kept


_PROBE = """
import json, torch
from convert.tiny_model import tiny_config
from modules import family_for
from pipeline.stage import Stage
from trainer.memory import probe_micro_batch, resident_bytes
torch.manual_seed(0)
config = tiny_config("gptneox", 384, num_layers=3, hidden=256, heads=4)
stage = Stage(family_for("gptneox"), config, range(0, 3), is_first=False, is_last=False)
stage.init_parts(0.02, seed=0)
stage.train()
inputs = [torch.randn(2, 512, 256, requires_grad=True) for _ in range(5)]
stage(inputs[0]).sum().backward()  # first use: kernels and allocator settle
start = resident_bytes()
held, blocks = probe_micro_batch(stage, lambda: stage(inputs[0]))
before = resident_bytes()
outputs = [stage(x) for x in inputs[1:]]  # four micro-batches' graphs, held as a schedule holds them
print(json.dumps([held, blocks, (resident_bytes() - before) / 4, before - start]))
"""


def test_probe_counts_what_a_held_micro_batch_occupies() -> None:
    # A fresh process whose freed memory goes back to the system, so its resident set follows
    # what it holds (in this one, earlier tests leave memory that malloc hands out again).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    held, blocks, grown, left = json.loads(done.stdout.splitlines()[-1])
    assert left < 0.05 * held  # the probe's own graph is gone once it returns
    assert grown > 50e6  # activations of 2 x 512 tokens through 3 blocks: the measure is not noise
    assert abs(held - grown) < 0.1 * grown, (held, grown)
    # each block's share is about a third: the blocks are alike; what is left is the output
    assert len(blocks) == 3 and max(blocks) < 1.05 * min(blocks)
    assert held - sum(blocks) == 2 * 512 * 256 * 4
