"""Every family through the same pipeline, each against HF's own model.

GPT-J, LLaMA (GQA, scaled RoPE, tied embeddings) and GPT-2 train through real ranks; the
LLaMA-layout families of ``modules.decoders`` (Qwen2/3, Mistral, Gemma 1/2/3, Phi-3, OLMo 2, and
LLaMA with a padding token) each as one tiny model with its quirks on (``tiny_config``), trained
by their stages chained in one process at pp=1 and on an uneven pp=2 split; Gemma 2, which has
the most of them, also through real ranks. The MoE routers' load-balancing loss equals HF's per
micro-batch on 1, 2 and 3 chained stages, and trains as HF's through three real ranks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convert.from_hf import convert_from_hf
from convert.tiny_model import build_tiny_model
from convert.to_hf import convert_to_hf
from modules import family_for, load_config
from pipeline.stage import Stage
from tests.helpers import (
    LOSS_ATOL,
    LR,
    SEED,
    SEQ,
    STEPS,
    WARMUP,
    assert_all_ok,
    assert_same_state,
    bundled_texts,
    chained_training,
    compare_to_reference,
    hf_reference_training,
    launch,
    load_hf_state,
    read_metrics,
    resume_elsewhere,
    train_args,
)

FAMILIES = ("gptj", "llama", "gpt2")
DECODERS = (
    "llama_pad", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "gemma2", "gemma3", "mixtral", "qwen3_moe",
)  # fmt: skip
DECODER_STEPS, DECODER_CLIP = 5, 0.5  # Gemma's first norms are ~0.9: clip below them


def tiny_converted(root: Path, family: str, num_layers: int = 4) -> tuple[Path, Path]:
    """(HF folder, shards) of a tiny model of ``family`` under ``root``."""
    hf = build_tiny_model(root / "hf", bundled_texts(), family, num_layers=num_layers, seed=1)
    return hf, convert_from_hf(hf, root / "shards")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(family, HF folder, shards) of a tiny 4-layer model of each family."""
    return request.param, *tiny_converted(tmp_path_factory.mktemp(request.param), request.param)


def test_chained_stages_and_round_trip_equal_hf(family_model: tuple[str, Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    family, hf, shards = family_model
    config = load_config(shards)
    assert family_for(config.model_type).name == family  # detected from config.json
    reference = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa").eval()
    first = Stage(family_for(family), config, range(0, 1), is_first=True, is_last=False)
    last = Stage(family_for(family), config, range(1, 4), is_first=False, is_last=True)
    for stage in (first, last):
        stage.load_parts(str(shards))
        stage.eval()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(last(first(ids)), reference(ids).logits, atol=1e-5, rtol=0)

    out = convert_to_hf(shards, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = reference.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    written = load_file(out / "model.safetensors")
    # tied: one tensor on disk, as HF writes it (our shards hold a copy at each end)
    assert ("lm_head.weight" in written) != bool(config.tie_word_embeddings)


@pytest.mark.ranks
def test_pp2_matches_hf(family_model: tuple[str, Path, Path], two_tasks: str, tmp_path: Path) -> None:
    family, hf, shards = family_model
    ckpt = tmp_path / "ckpt"
    assert_all_ok(launch(train_args(shards, two_tasks, ckpt, pp=2, dp=1, batch=4, micro=2, accum=1), 2, tmp_path))
    state = compare_to_reference(hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)
    config = load_config(shards)
    activations = 2 * 2 * (2 * SEQ * config.hidden_size * 4)  # 2 micro-batches of 2 x SEQ, there and back
    positions = 2 * (2 * SEQ * 4)  # examples packed apart: int32 position ids beside the activations, forward
    tied = 2 * config.vocab_size * config.hidden_size * 4 if config.tie_word_embeddings else 0  # each end's copy
    assert {r["comm_bytes"] for r in read_metrics(ckpt) if "loss" in r} == {activations + positions + tied}
    if family in ("llama", "gpt2"):  # tied: the two stages' copies stayed one tensor
        embedding = load_file(ckpt / "checkpoint_10" / "embs.safetensors")
        head = load_file(ckpt / "checkpoint_10" / "lm_head.safetensors")
        assert torch.equal(
            embedding["embed_tokens.weight" if family == "llama" else "wte.weight"], head["lm_head.weight"]
        )
    if family == "llama":  # a pp=2 checkpoint of a tied model resumes in one process, where both ends are one tensor
        resume_elsewhere(shards, two_tasks, ckpt, state, tmp_path / "resumed")


@pytest.mark.ranks
def test_llama_tied_pp2_dp2_matches_hf(
    two_tasks: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    hf, shards = tiny_converted(tmp_path_factory.mktemp("llama_grid"), "llama")
    ckpt = tmp_path / "ckpt"
    args = train_args(shards, two_tasks, ckpt, pp=2, dp=2, batch=2, micro=1, accum=1)
    # the chunked loss through a tied output weight (auto leaves a tiny vocabulary whole)
    assert_all_ok(launch([*args, "--loss-chunk-tokens", "8"], 4, tmp_path))
    compare_to_reference(hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)


@pytest.mark.ranks
def test_gpt2_zero_bubble_with_accumulation_matches_hf(
    two_tasks: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """zb1 defers GPT-2's Conv1D weight gradients and the head's (the tied copy, summed with the
    embedding's after every W ran), over two accumulation rounds in one pipeline pass."""
    hf, shards = tiny_converted(tmp_path_factory.mktemp("gpt2_zb1"), "gpt2")
    ckpt = tmp_path / "ckpt"
    args = train_args(shards, two_tasks, ckpt, pp=2, dp=1, batch=2, micro=1, accum=2)
    assert_all_ok(launch([*args, "--pp-mode", "zb1"], 2, tmp_path))
    compare_to_reference(hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)


@pytest.mark.parametrize("family", ["gptneox", "llama", "gpt2"])
def test_random_init_ignores_the_split_and_ties_both_ends(family: str) -> None:
    from convert.tiny_model import tiny_config

    config = tiny_config(family, 100, num_layers=4)
    config._attn_implementation = "sdpa"
    spec = family_for(family)
    split = [Stage(spec, config, range(0, 1), True, False), Stage(spec, config, range(1, 4), False, True)]
    whole = Stage(spec, config, range(0, 4), True, True)
    for stage in (*split, whole):
        stage.init_parts(0.02, seed=5)
    pieces = {**split[0].state_dict(), **split[1].state_dict()}
    assert pieces.keys() == whole.state_dict().keys()
    assert all(torch.equal(pieces[k], v) for k, v in whole.state_dict().items())
    if config.tie_word_embeddings:
        embedding_key, head_key = spec.tied_keys
        assert torch.equal(split[0].embedding.get_parameter(embedding_key), split[1].head.get_parameter(head_key))


# -- the LLaMA-layout families, each with its quirks on --------------------------------------------


@pytest.fixture(scope="module", params=DECODERS)
def decoder_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(family, HF folder, shards) of a tiny 5-layer model of each LLaMA-layout family."""
    return request.param, *tiny_converted(tmp_path_factory.mktemp(request.param), request.param, num_layers=5)


def test_decoder_family_trains_as_hf(decoder_model: tuple[str, Path, Path], two_tasks: str) -> None:
    """pp=1 and an uneven pp=2 (1 + 4 layers) of our stages train exactly as HF's model: loss
    and gradient norm per step, and the final weights (padding row and tied ends included)."""
    family, hf, shards = decoder_model
    config = load_config(shards)
    assert family_for(config.model_type).name == family.replace("llama_pad", "llama")
    ref_losses, ref_norms, ref_state = hf_reference_training(
        hf, two_tasks, SEQ, SEED, per_step=4, steps=DECODER_STEPS, lr=LR, warmup=WARMUP, max_grad_norm=DECODER_CLIP
    )
    assert ref_losses[-1] < ref_losses[0] and max(ref_norms) > DECODER_CLIP  # it learns, and clipping acts
    for splits in ([range(0, 5)], [range(0, 1), range(1, 5)]):
        losses, norms, state = chained_training(shards, splits, two_tasks, 4, DECODER_STEPS, DECODER_CLIP)
        assert losses == pytest.approx(ref_losses, abs=LOSS_ATOL, rel=0), splits
        assert norms == pytest.approx(ref_norms, rel=1e-5), splits
        assert_same_state(state, ref_state)
    # the padding token (EOS) was in the data: its embedding row is trained only through a tied head
    pad = config.pad_token_id
    loaded = load_file(shards / "embs.safetensors")["embed_tokens.weight"][pad]
    assert torch.equal(ref_state["model.embed_tokens.weight"][pad], loaded) != bool(config.tie_word_embeddings)


def test_decoder_family_round_trip_and_random_init(decoder_model: tuple[str, Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, hf, shards = decoder_model
    out = convert_to_hf(shards, tmp_path / "hf")
    back, original = load_hf_state(out), load_hf_state(hf)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    # and on disk as HF writes it (MoE: one tensor per expert, where the model fuses them)
    written, saved = load_file(out / "model.safetensors"), load_file(hf / "model.safetensors")
    assert written.keys() == saved.keys()
    assert all(torch.equal(written[k], saved[k]) for k in saved)
    # fresh weights as HF's own initialisation lays them out: padding row 0, Gemma's norms at 0
    config = load_config(shards)
    stage = Stage(family_for(config.model_type), config, range(0, 5), True, True)
    stage.init_parts(0.02, seed=3)
    fresh = AutoModelForCausalLM.from_config(config).state_dict()
    ours = {family_for(config.model_type).shard_to_hf(p, k): v for p, m in stage.parts().items()
            for k, v in m.state_dict().items()}  # fmt: skip
    assert ours.keys() == fresh.keys()
    for key, value in fresh.items():
        if value.ndim == 1 and "norm" in key:
            assert torch.equal(ours[key], value), key  # 1, or 0 where the norm is (1 + weight)
    assert not ours["model.embed_tokens.weight"][config.pad_token_id].any()


@pytest.mark.ranks
def test_gemma2_pp2_through_ranks_matches_hf(
    two_tasks: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Gemma 2 over two real ranks: eager attention, both soft-caps (the final one inside the
    chunked loss), alternating sliding windows shorter than the sequence, tied ends on two stages."""
    hf, shards = tiny_converted(tmp_path_factory.mktemp("gemma2_ranks"), "gemma2", num_layers=5)
    ckpt = tmp_path / "ckpt"
    args = train_args(shards, two_tasks, ckpt, pp=2, dp=1, batch=4, micro=2, accum=1)
    assert_all_ok(launch([*args, "--loss-chunk-tokens", "8"], 2, tmp_path))
    compare_to_reference(hf, two_tasks, ckpt, per_step=4, tmp_path=tmp_path)


# -- refusals that help -------------------------------------------------------------------------


def relabelled(hf: Path, root: Path, model_type: str) -> Path:
    """A copy of ``hf`` whose config.json claims another ``model_type`` (the architectures stay)."""
    import json
    import shutil

    copy = Path(shutil.copytree(hf, root / f"{hf.name}_as_{model_type}"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return copy


def test_unsupported_family_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BloomConfig

    from convert.from_hf import main

    hf = tmp_path / "bloom"
    config = BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    with pytest.raises(SystemExit) as exc:
        main(["--model-name", str(hf), "--save-dir", str(tmp_path / "out")])
    message = str(exc.value.code)
    assert "unsupported model type 'bloom'" in message and "qwen2" in message and "gemma3_text" in message
    assert "--model-type" not in message and "\n" not in message  # no hint that leads to a traceback
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unsupported model type 'bloom'"):
        load_config(hf)  # what the trainer reads first at start-up


def test_relabelled_config_is_refused_naming_both(tmp_path: Path) -> None:
    """A config.json relabelled as another family would compute silently wrong: refused, naming both."""
    hf, shards = tiny_converted(tmp_path, "gemma", num_layers=2)
    with pytest.raises(ValueError, match="model_type 'llama' but its architectures name GemmaForCausalLM"):
        convert_from_hf(relabelled(hf, tmp_path, "llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=re.escape("GemmaForCausalLM (model type gemma)")):
        load_config(relabelled(shards, tmp_path, "llama"))
    with pytest.raises(ValueError, match=re.escape("--model-type llama contradicts config.json's model_type 'gemma'")):
        convert_from_hf(hf, tmp_path / "out", model_type="llama")
    with pytest.raises(ValueError, match="--model-type llama contradicts"):
        load_config(shards, "llama")
    assert family_for(load_config(shards, "gemma").model_type).name == "gemma"  # agreeing is fine


@pytest.mark.ranks
def test_relabelled_model_is_refused_at_start_up_before_connecting(tmp_path: Path, two_tasks: str) -> None:
    """Rank 0 of two, alone: it stops with the one-line reason instead of waiting for rank 1
    (had it connected, it would wait --comm-timeout, 300 s, and the launch's 120 s would kill it)."""
    _, shards = tiny_converted(tmp_path, "gemma", num_layers=2)
    args = train_args(relabelled(shards, tmp_path, "llama"), two_tasks, tmp_path / "ckpt", pp=2, dp=1, batch=2,
                      micro=1, accum=1)  # fmt: skip
    (result,) = launch(args, 2, tmp_path, timeout=120, ranks=[0])
    assert result.returncode == 1, result.output[-2000:]
    assert "model_type 'llama' but its architectures name GemmaForCausalLM" in result.output
    assert "Traceback" not in result.output


def test_failed_conversion_leaves_nothing_behind(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills after two shards: neither the folder nor a partial copy stays."""
    import errno

    import convert.from_hf

    written = []

    def save_part(model_dir: Path, part: str, tensors: dict) -> None:
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(part)
        (Path(model_dir) / f"{part}.safetensors").write_bytes(b"half")

    monkeypatch.setattr(convert.from_hf, "save_part", save_part)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder given as --save-dir: it stays as it was
    with pytest.raises(OSError, match="No space left"):
        convert.from_hf.convert_from_hf(tiny_hf, out)
    assert len(written) == 2
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_eager_attention_where_hf_requires_it() -> None:
    """Gemma 2's soft-capped attention cannot run under SDPA: eager, for our stages and the oracle."""
    from convert.tiny_model import tiny_config
    from modules import attention_implementation

    assert attention_implementation(tiny_config("gemma2", 64, 2)) == "eager"
    assert attention_implementation(tiny_config("gemma3", 64, 2)) == "sdpa"  # no attention soft-cap
    assert attention_implementation(tiny_config("qwen2", 64, 2)) == "sdpa"


def test_check_command_passes_and_catches_a_difference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m pipeline.check`` on shards and on the HF folder: exit 0; with our final
    soft-capping broken, the same check exits 1."""
    import modules.common
    from pipeline.check import compare, main

    hf, shards = tiny_converted(tmp_path, "gemma2", num_layers=3)
    for folder in (shards, hf):
        with pytest.raises(SystemExit) as exc:
            main(["--model-name", str(folder), "--stages", "3", "--seq-length", "32"])
        assert exc.value.code == 0
    result = compare(shards, stages=2, seq_length=32)
    assert result.logits_diff == 0.0 and result.grad_diff == 0.0  # the same kernels on the same weights
    monkeypatch.setattr(modules.common, "soft_cap", lambda logits, cap: logits)
    with pytest.raises(SystemExit) as exc:
        main(["--model-name", str(shards), "--seq-length", "32"])
    assert exc.value.code == 1


# -- the routers' load-balancing loss -----------------------------------------------------------

ROUTER_COEF = 0.3  # far above HF's 0.001-0.02, so a wrong aux term shows in the loss and weights


def with_router_loss_on(*folders: Path) -> None:
    """Turn HF's load-balancing loss on in each model folder's config.json (HF's default is off)."""
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        config.update(output_router_logits=True, router_aux_loss_coef=ROUTER_COEF)
        (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_router_loss_per_micro_batch_equals_hf_at_pp2_and_pp3(family: str, tmp_path: Path) -> None:
    """The aux loss our stages form from the sums passed along equals HF's ``aux_loss`` for the
    same micro-batch bit for bit, and every router's gradient (and the loss's) equals HF's, on 1,
    2 and 3 stages (Qwen3-MoE's layer 1 is dense: its stage passes the sums on)."""
    from transformers import AutoModelForCausalLM

    from pipeline.chain import StageChain

    hf_dir, shards = tiny_converted(tmp_path, family, num_layers=5)
    with_router_loss_on(hf_dir, shards)
    config = load_config(shards)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation=config._attn_implementation)
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    out = hf(input_ids=ids, labels=ids)
    out.loss.backward()
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    for splits in ([range(0, 5)], [range(0, 2), range(2, 5)], [range(0, 1), range(1, 3), range(3, 5)]):
        chain = StageChain(family_for(config.model_type), config, splits)
        chain.load(str(shards))
        logits, aux = chain.routed(ids)
        assert torch.equal(aux, out.aux_loss), splits
        assert torch.equal(logits, out.logits), splits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
        (ce + ROUTER_COEF * aux).backward()
        chain.sum_tied_grads()
        routers = 0
        for part, module in chain.parts():
            for local, param in module.named_parameters():
                reference = hf_params[chain.family.shard_to_hf(part, local)].grad
                torch.testing.assert_close(param.grad, reference, msg=f"{splits} {part}.{local}")
                routers += local.endswith("mlp.gate.weight") and bool(param.grad.abs().sum() > 0)
        # every router got a gradient (Mixtral's five; Qwen3-MoE's four beside its dense layer)
        assert routers == sum(isinstance(m, chain.stages[0].balance.router) for m in hf.modules()) >= 4, splits
    assert out.aux_loss > 1.0  # E * sum(share x prob) is 1 when perfectly balanced: a real value


def test_a_first_stage_without_routers_passes_the_sums_on() -> None:
    """Qwen3-MoE with dense first layers: the first stage's sums carry no graph, yet the next
    stage sends their gradient back; the backward takes what has a graph and trains the stage."""
    from comm.p2p import Message
    from convert.tiny_model import tiny_config
    from modules import attention_implementation, experts_implementation
    from pipeline.schedule import MicroBatch, RouterLoss, StepSpec, one_f_one_b_step
    from tests.toy_pipeline import LoopbackComm

    config = tiny_config("qwen3_moe", 64, 4)
    config.mlp_only_layers, config.output_router_logits, config.router_aux_loss_coef = [0, 1], True, ROUTER_COEF
    config._attn_implementation = attention_implementation(config)
    config._experts_implementation = experts_implementation(config)
    stage = Stage(family_for("qwen3_moe"), config, range(0, 2), is_first=True, is_last=False)
    stage.init_parts(0.02, seed=0)
    sent: list[Message] = []

    class Recording(LoopbackComm):
        def send_forward(self, message: Message, wait: bool = True) -> None:
            sent.append(message)

    spec = StepSpec((1, 8, config.hidden_size), torch.float32, loss_fn=lambda y, micro: y.sum(),
                    router_loss=RouterLoss(stage.balance, ROUTER_COEF))  # fmt: skip
    micro = [MicroBatch(torch.randint(0, 64, (1, 8)), None)] * 2
    one_f_one_b_step(stage, Recording(0, 2), micro, spec)
    assert all(m.side is not None and not m.side.any() for m in sent)  # no router yet: zero sums sent on
    assert all(p.grad is not None for p in stage.parameters() if p.requires_grad and "experts" not in str(p.shape))


def hf_router_reference(hf_dir: Path, tasks: str, per_step: int, micro: int) -> tuple[list, list, list, dict]:
    """HF's model trained in one process as the trainer defines a step with the router loss: the
    mean token loss over the global batch plus the coefficient times the mean over micro-batches
    of HF's ``aux_loss`` for each micro-batch alone. Losses, norms, aux means, final weights."""
    from transformers import AutoModelForCausalLM

    from data.stream import IGNORE_INDEX
    from pipeline.chain import exact_norm
    from tests.helpers import _train_in_process

    torch.manual_seed(0)
    config = load_config(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation=config._attn_implementation)
    model.train()
    trained = list(model.parameters())
    auxes: list[float] = []

    def loss_of(batch: object) -> torch.Tensor:
        count, tokens, total, aux_sum = per_step // micro, batch.loss_tokens(), 0.0, 0.0
        for start in range(0, per_step, micro):
            rows = slice(start, start + micro)
            # HF's aux_loss of this micro-batch alone, its examples kept apart (found without a cache)
            out = model(input_ids=batch.input_ids[rows], position_ids=batch.positions()[rows], use_cache=False)
            logits, labels = out.logits[:, :-1].reshape(-1, config.vocab_size), batch.labels[rows, 1:].reshape(-1)
            ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            total = total + ce / tokens + ROUTER_COEF * out.aux_loss / count
            aux_sum += out.aux_loss.item()
        auxes.append(aux_sum / count)
        return total

    def clip(limit: float) -> torch.Tensor:
        norm = exact_norm([p.grad for p in trained])
        torch.nn.utils.clip_grad_norm_(trained, limit)
        return norm

    losses, norms = _train_in_process(
        trained, loss_of, clip, hf_dir, tasks, SEQ, SEED, per_step, STEPS, LR, WARMUP, 1.0
    )
    return losses, norms, auxes, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.ranks
def test_mixtral_router_loss_through_three_ranks_matches_hf(
    short_tasks: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Mixtral over three real ranks under zero bubble, two micro-batches a step: the router sums
    travel beside the activations (and their gradient beside the activations' gradient through
    the middle stage), and so do the positions of examples packed apart (sliding windows inside
    each); ``--moe-aux-loss-coef`` turns the loss on over a config that leaves it off. Loss,
    gradient norm and the aux_loss column per step, and the final weights, equal HF's."""
    hf, shards = tiny_converted(tmp_path_factory.mktemp("mixtral_ranks"), "mixtral", num_layers=5)
    ckpt = tmp_path / "ckpt"
    args = train_args(shards, short_tasks, ckpt, pp=3, dp=1, batch=4, micro=2, accum=1)
    flags = ["--pp-mode", "zb1", "--moe-aux-loss-coef", str(ROUTER_COEF)]
    assert_all_ok(launch([*args, *flags], 3, tmp_path))
    with_router_loss_on(hf)
    ref_losses, ref_norms, ref_auxes, ref_state = hf_router_reference(hf, short_tasks, per_step=4, micro=2)
    rows = [r for r in read_metrics(ckpt) if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, abs=LOSS_ATOL, rel=0)
    assert [r["aux_loss"] for r in rows] == pytest.approx(ref_auxes, abs=1e-6, rel=0)
    assert [r["grad_norm"] for r in rows] == pytest.approx(ref_norms, rel=1e-5)
    assert min(ref_auxes) > 1.0 and rows[-1]["loss"] < rows[0]["loss"]
    assert_same_state(load_hf_state(convert_to_hf(ckpt, tmp_path / "hf")), ref_state)


def test_router_loss_flag_is_checked(tmp_path: Path, two_tasks: str) -> None:
    """--moe-aux-loss-coef on a model without experts, or below 0, is refused in one line; 0
    turns a config's loss off and the start-up line says which loss the routers train with."""
    from modules import describe_model
    from modules.routing import with_router_loss
    from pipeline.stage import Stage

    _, shards = tiny_converted(tmp_path / "moe", "mixtral", num_layers=2)
    with_router_loss_on(shards)
    config = load_config(shards)
    assert f"router load-balancing loss x {ROUTER_COEF:g}" in describe_model(config)
    family = family_for(config.model_type)
    assert Stage(family, config, range(0, 2), True, True).balance.coef == ROUTER_COEF
    off = with_router_loss(load_config(shards), 0.0)
    assert Stage(family, off, range(0, 2), True, True).balance is None
    assert "no router loss" in describe_model(off)
    with pytest.raises(ValueError, match="negative; use 0"):
        with_router_loss(config, -0.1)
    from trainer.cli import config_from_args, parse_args
    from trainer.startup import plan_stage

    _, dense = tiny_converted(tmp_path / "dense", "llama", num_layers=2)
    args = train_args(dense, two_tasks, tmp_path / "ckpt", pp=1, dp=1, batch=2, micro=1, accum=1)
    cfg = config_from_args(parse_args([*args, "--rank", "0", "--moe-aux-loss-coef", "0.01"]))
    with pytest.raises(ValueError, match="--moe-aux-loss-coef: llama models have no experts to balance; drop the flag"):
        plan_stage(cfg)


def test_expert_layout_refuses_missing_experts() -> None:
    from modules.experts import MIXTRAL

    tensors = {
        f"block_sparse_moe.experts.{e}.{n}.weight": torch.zeros(4, 2) for e in (0, 2) for n in ("w1", "w2", "w3")
    }
    with pytest.raises(KeyError, match="experts incomplete"):
        MIXTRAL.to_memory(tensors)
    fused = MIXTRAL.to_memory({k.replace(".2.", ".1."): v for k, v in tensors.items()})
    assert fused["mlp.experts.gate_up_proj"].shape == (2, 8, 2) and fused["mlp.experts.down_proj"].shape == (2, 4, 2)


def test_start_up_says_what_the_stages_compute() -> None:
    from convert.tiny_model import tiny_config
    from modules import attention_implementation, describe_model

    config = tiny_config("gemma2", 64, 4)
    config._attn_implementation = attention_implementation(config)
    said = describe_model(config)
    for quirk in (
        "gemma2",
        "eager attention",
        "padding row 0 trained through the tied head only",
        "scaled by 5.657",
        "sliding window 8 on 2 of 4 layers",
        "attention soft-capped at 10",
        "final logits soft-capped at 5",
    ):
        assert quirk in said, said  # fmt: skip
    plain = describe_model(tiny_config("gptneox", 64, 2))
    assert "padding" not in plain and "sliding" not in plain and "soft" not in plain
