"""GRPO's loss (objectives/grpo.py) and advantages (objectives/rewards.py) against TRL's own.

The same completions of a tiny LLaMA, with old log-probs from other weights (a second iteration
on the same rollouts) and a reference's, go through TRL's ``GRPOTrainer._compute_loss`` (on the
HF model, one call per micro-batch as its gradient accumulation makes them) and through our last
stage's ``GrpoLoss`` over the chunked head: the step's loss and the gradients agree to 1e-5 for
every loss type, token- and sequence-level importance sampling, clip-higher and the KL penalty,
at a sampling temperature. The advantages and reward metrics agree with TRL's formulas on groups
with None rewards, an unscored completion and a group whose rewards are all alike; a reward
function that raises, returns the wrong count or NaN, or cannot be found is one line naming it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from convert.from_hf import convert_from_hf
from convert.tiny_model import build_tiny_model
from data.stream import IGNORE_INDEX
from modules import family_for, load_config
from objectives.grpo import GrpoLoss, GrpoSettings
from objectives.rewards import advantages, load_reward_function, nanstd, score
from pipeline.stage import Stage
from tests.helpers import bundled_texts

trl = pytest.importorskip("trl", reason="the GRPO oracle needs TRL (requirements-dev.txt)")

TEMPERATURE = 0.7
MICRO, ROWS, PROMPT, COMPLETION = 2, 4, 6, 5


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grpo_llama")
    hf = build_tiny_model(root / "hf", bundled_texts(), "llama", num_layers=2, seed=1)
    return hf, convert_from_hf(hf, root / "shards")


def rollouts(vocab: int) -> dict[str, torch.Tensor]:
    """Four completions (two micro-batches of two) of left-padded prompts, right-padded."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (ROWS, PROMPT), generator=g)
    prompt_mask = torch.ones(ROWS, PROMPT, dtype=torch.long)
    prompt_mask[1, :2] = prompt_mask[3, :1] = 0  # left padding
    completion_ids = torch.randint(3, vocab, (ROWS, COMPLETION), generator=g)
    completion_mask = torch.ones(ROWS, COMPLETION, dtype=torch.long)
    completion_mask[0, 3:] = completion_mask[2, 1:] = 0  # ended early
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([1.3, -0.4, -0.9, 0.6])}  # fmt: skip


def hf_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The completion tokens' log-probs at the sampling temperature, as TRL scores them."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -keep:, None]).squeeze(-1)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return other


def trl_step(model: torch.nn.Module, data: dict, settings: GrpoSettings, old: torch.Tensor, ref: torch.Tensor) -> float:
    """TRL's loss of the step, one ``_compute_loss`` per micro-batch (its gradients accumulate)."""
    from trl import GRPOTrainer

    accum = ROWS // MICRO

    def logps_and_entropies(_model, input_ids, attention_mask, logits_to_keep, **_):
        return hf_logps(_model, input_ids, attention_mask, logits_to_keep), torch.zeros(input_ids.shape[0], 1), None

    identity = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x, num_processes=1,
                               gather_for_metrics=lambda x: x)  # fmt: skip
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, loss_type=settings.loss_type,
        importance_sampling_level=settings.importance_sampling_level, beta=settings.beta,
        epsilon_low=settings.epsilon, epsilon_high=settings.clip_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=model, current_gradient_accumulation_steps=accum,
        max_completion_length=settings.max_completion_length, accelerator=identity, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=settings.kl_ratio_correction, delta=None,
                             steps_per_generation=accum),
        _get_per_token_logps_and_entropies=logps_and_entropies,
    )  # fmt: skip
    tokens = data["completion_mask"].sum()
    total = 0.0
    for start in range(0, ROWS, MICRO):
        rows = slice(start, start + MICRO)
        inputs = {key: value[rows] for key, value in data.items()}
        inputs |= {"old_per_token_logps": old[rows], "ref_per_token_logps": ref[rows], "num_items_in_batch": tokens}
        loss = GRPOTrainer._compute_loss(stub, model, inputs)
        loss.backward()
        total += loss.item()
    return total


def our_step(stage: Stage, data: dict, settings: GrpoSettings, old: torch.Tensor, ref: torch.Tensor) -> tuple:
    """Our last stage: each completion as prompt then completion, right-padded, unpadded in front;
    the loss over the chunked head, each micro-batch's part over the step's normalizer."""
    sequences, labels, olds, refs = [], [], [], []
    length = PROMPT + COMPLETION
    for r in range(ROWS):
        prompt = data["prompt_ids"][r][data["prompt_mask"][r] == 1]
        kept = int(data["completion_mask"][r].sum())
        completion = data["completion_ids"][r][:kept]
        ids = torch.cat([prompt, completion, torch.zeros(length - len(prompt) - kept, dtype=torch.long)])
        label = torch.full((length,), IGNORE_INDEX)
        label[len(prompt) : len(prompt) + kept] = completion
        # the log-probs per position predicting a completion token (length - 1 positions)
        place = torch.zeros(2, length - 1)
        place[0, len(prompt) - 1 : len(prompt) - 1 + kept] = old[r, :kept]
        place[1, len(prompt) - 1 : len(prompt) - 1 + kept] = ref[r, :kept]
        sequences.append(ids)
        labels.append(label)
        olds.append(place[0])
        refs.append(place[1])
    ids, labels, olds, refs = (torch.stack(x) for x in (sequences, labels, olds, refs))
    mask = (labels[:, 1:] != IGNORE_INDEX).float()
    micro = [slice(s, s + MICRO) for s in range(0, ROWS, MICRO)]
    normalizer = sum(settings.count(mask[rows]) for rows in micro)
    loss_fn = GrpoLoss(stage, normalizer, chunk=3, device=torch.device("cpu"), settings=settings)
    total = 0.0
    for rows in micro:
        targets = {"labels": labels[rows], "advantages": data["advantages"][rows], "old_logps": olds[rows],
                   "ref_logps": refs[rows]}  # fmt: skip
        loss = loss_fn(stage(ids[rows]), targets)
        loss.backward()
        total += loss.item()
    return total, loss_fn


CASES = [
    GrpoSettings("grpo"),
    GrpoSettings("bnpo"),
    GrpoSettings("dr_grpo", max_completion_length=COMPLETION),
    GrpoSettings("dapo", epsilon_high=0.28),
    GrpoSettings("grpo", importance_sampling_level="sequence", epsilon=0.003, epsilon_high=0.004),
    GrpoSettings("dapo", importance_sampling_level="sequence", beta=0.04),
    GrpoSettings("dapo", beta=0.04, epsilon=0.05),
    GrpoSettings("bnpo", beta=0.1, kl_ratio_correction=False),
]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s.loss_type}-{s.importance_sampling_level}-b{s.beta}")
def test_loss_and_gradients_equal_trl(settings: GrpoSettings, llama: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    hf, shards = llama
    settings = GrpoSettings(**{**settings.__dict__, "temperature": TEMPERATURE})
    model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa").train()
    data = rollouts(model.config.vocab_size)
    ids = torch.cat([data["prompt_ids"], data["completion_ids"]], 1)
    mask = torch.cat([data["prompt_mask"], data["completion_mask"]], 1)
    with torch.no_grad():  # the sampling policy and the reference: other weights than those trained
        old = hf_logps(perturbed(model, 1), ids, mask, COMPLETION)
        ref = hf_logps(perturbed(model, 2), ids, mask, COMPLETION)
    theirs = trl_step(model, data, settings, old, ref)

    config = load_config(shards)
    stage = Stage(family_for(config.model_type), config, range(config.num_hidden_layers), True, True)
    stage.load_parts(str(shards))
    stage.project_logits = False  # the chunked head, as the trainer runs it on a large vocabulary
    stage.train()
    ours, loss_fn = our_step(stage, data, settings, old, ref)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    grads = {"embed_tokens.weight": model.model.embed_tokens.weight.grad,
             "layers.1.self_attn.q_proj.weight": model.model.layers[1].self_attn.q_proj.weight.grad,
             "head.norm.weight": model.model.norm.weight.grad}  # fmt: skip
    mine = dict(stage.named_parameters())
    for name, expected in grads.items():
        got = mine[name if not name.startswith("embed") else "embedding.embed_tokens.weight"].grad
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4, msg=name)
    row = loss_fn.row(loss_fn.totals.tolist())
    assert set(row) == {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"} | (
        {"kl"} if settings.beta else set()
    )
    if settings.importance_sampling_level == "sequence" and settings.epsilon < 0.01:
        assert row["clip_ratio/region_mean"] > 0  # the tight clip range was hit: the clipped branch is tested


def trl_advantages(table: torch.Tensor, weights: list[float], group: int, scale: str) -> torch.Tensor:
    """TRL 1.16's sum_then_normalize, written out as its GRPOTrainer computes it."""
    from trl.trainer.utils import nanstd as trl_nanstd

    unscored = torch.isnan(table).all(dim=1)
    rewards = (table * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    rewards[unscored] = torch.nan
    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
    if scale == "batch":
        std = trl_nanstd(rewards).expand_as(rewards)
    else:
        std = trl_nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
    out = rewards - mean
    if scale != "none":
        out = out / (std + 1e-4)
    return torch.nan_to_num(out, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale: str) -> None:
    nan = math.nan
    table = torch.tensor([[1.0, nan], [0.0, 0.5], [nan, nan], [1.0, 1.0],  # a group with an unscored completion
                          [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5],  # all alike: advantages 0
                          [2.0, nan], [0.0, nan], [1.0, 0.0], [3.0, -1.0]])  # fmt: skip
    scored = advantages(table, [1.0, 0.5], 4, scale, ["right", "short"])
    torch.testing.assert_close(scored.advantages, trl_advantages(table, [1.0, 0.5], 4, scale), rtol=0, atol=1e-6)
    assert scored.advantages[2] == 0 and (scored.advantages[4:8] == 0).all()
    from trl.trainer.utils import nanstd as trl_nanstd

    assert scored.metrics["rewards/short/mean"] == pytest.approx(torch.nanmean(table[:, 1]).item())
    assert scored.metrics["rewards/right/std"] == pytest.approx(trl_nanstd(table[:, 0]).item())
    assert scored.metrics["reward"] == pytest.approx(torch.nanmean(scored.rewards).item())
    expected_zero = 1 / 3 if scale != "batch" else 0.0  # one group of three had one reward throughout
    assert scored.metrics["frac_reward_zero_std"] == pytest.approx(expected_zero)
    torch.testing.assert_close(nanstd(table[:, 0]), trl_nanstd(table[:, 0]))


def exact_answer(prompts, completions, completion_ids, answer, **_):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def test_reward_functions_as_trl_calls_them(tmp_path: Path) -> None:
    path = tmp_path / "rewards.py"
    path.write_text(
        "def length(prompts, completions, completion_ids, **kwargs):\n"
        "    return [None if not ids else float(len(ids)) for ids in completion_ids]\n"
    )
    functions = [load_reward_function(f"{path}:length"), load_reward_function("tests.test_grpo:exact_answer")]
    assert [f.name for f in functions] == ["length", "exact_answer"]
    table = score(functions, ["1+1=", "2+2="], [" 2", "5"], [[7, 8], []], {"answer": ["2", "4"]})
    torch.testing.assert_close(table, torch.tensor([[2.0, 1.0], [math.nan, 0.0]]), equal_nan=True)


@pytest.mark.parametrize(
    "body,error",
    [
        ("raise KeyError('answer')", "reward function {spec} raised KeyError: 'answer'"),
        ("return [1.0]", "reward function {spec} returned 1 rewards for 2 completions"),
        ("return [1.0, float('nan')]", "reward function {spec} returned nan for completion 1"),
        ("return [1.0, 'yes']", "reward function {spec} returned 'yes' for completion 1"),
    ],
)
def test_a_bad_reward_function_is_one_line_naming_it(body: str, error: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.py"
    path.write_text(f"def reward(prompts, completions, completion_ids, **kwargs):\n    {body}\n")
    spec = f"{path}:reward"
    with pytest.raises(ValueError) as caught:
        score([load_reward_function(spec)], ["a", "b"], ["x", "y"], [[1], [2]], {})
    assert error.format(spec=spec) in str(caught.value) and "\n" not in str(caught.value)


def test_a_reward_function_that_cannot_be_found_is_named(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text("value = 3\n")
    cases = {
        "no_colon": "give module.path:function or path/to/file.py:function",
        f"{tmp_path}/missing.py:f": f"no such file {tmp_path}/missing.py",
        "no_such_module_here:f": "cannot import no_such_module_here (ModuleNotFoundError",
        f"{tmp_path}/ok.py:f": "has no f",
        f"{tmp_path}/ok.py:value": "is a int, not a function",
    }
    for spec, error in cases.items():
        with pytest.raises(ValueError) as caught:
            load_reward_function(spec)
        assert error in str(caught.value), (spec, caught.value)


def test_settings_are_checked() -> None:
    for kwargs, error in [
        ({"loss_type": "ppo"}, "--loss-type 'ppo': choose one of grpo, bnpo, dr_grpo, dapo"),
        ({"importance_sampling_level": "word"}, "choose token or sequence"),
        ({"epsilon": 0.3, "epsilon_high": 0.2}, "--epsilon-high 0.2 is below --epsilon 0.3"),
        ({"beta": -1.0}, "--beta must be 0"),
    ]:
        with pytest.raises(ValueError) as caught:
            GrpoSettings(**kwargs)
        assert error in str(caught.value)
    with pytest.raises(ValueError, match="--scale-rewards 'rank'"):
        advantages(torch.zeros(2, 1), [1.0], 2, "rank", ["f"])


def prompt_file(path: Path, count: int) -> Path:
    texts = bundled_texts()[:count]
    path.write_text("".join(json.dumps({"prompt": " ".join(t.split()[:5]), "topic": i}) + "\n"
                            for i, t in enumerate(texts)))  # fmt: skip
    return path


@pytest.mark.ranks
@pytest.mark.parametrize(
    "flags,settings",
    [
        ([], {"loss_type": "dapo"}),
        (["--loss-type", "grpo", "--importance-sampling-level", "sequence", "--epsilon-high", "0.28"],
         {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon_high": 0.28}),
    ],
    ids=["dapo", "grpo-sequence"],
)  # fmt: skip
def test_grpo_through_the_pipeline_trains_as_trl_on_its_completions(
    flags: list[str], settings: dict, llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """Three steps at pp=2 generate, score and train; TRL's GRPOTrainer given the same completions
    each step (tests/trl_oracle.py) computes the same loss, gradient norm and rollout metrics, and
    ends with the same weights."""
    from transformers import AutoModelForCausalLM

    from convert.to_hf import convert_to_hf
    from tests import trl_oracle
    from tests.grpo_rewards import parity, short
    from tests.helpers import LR, assert_all_ok, launch, load_hf_state, read_metrics

    hf, shards = llama
    prompts = prompt_file(tmp_path / "prompts.jsonl", 6)
    ckpt = tmp_path / "ckpt"
    args = ["--model-name", str(shards), "--task-name", str(prompts), "--pipeline-group-size", "2",
            "--objective", "grpo", "--reward-funcs", "tests.grpo_rewards:short", "tests.grpo_rewards:parity",
            "--reward-weights", "1.0", "0.5", "--num-generations", "4", "--batch-size", "8", "--micro-batch-size", "4",
            "--seq-length", "32", "--max-completion-length", "8", "--total-steps", "3", "--lr", str(LR),
            "--warmup-steps", "0", "--checkpoint-path", str(ckpt), *flags]  # fmt: skip
    assert_all_ok(launch(args, 2, tmp_path))
    rollouts = [json.loads(line) for line in (ckpt / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1] * 8 + [2] * 8 + [3] * 8
    ours = [r for r in read_metrics(ckpt) if "loss" in r]

    model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="sdpa")
    theirs = trl_oracle.grpo(model, hf, str(prompts), rollouts, tmp_path / "trl", 8, 4, [short, parity], 3, 8,
                             reward_weights=[1.0, 0.5], **settings)  # fmt: skip
    assert len(theirs.steps) == len(ours) == 3
    for mine, row in zip(ours, theirs.steps, strict=True):
        assert mine["loss"] == pytest.approx(row["loss"], rel=1e-4, abs=1e-6)
        assert mine["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-4)
        for name in ("reward", "reward_std", "rewards/short/mean", "rewards/parity/mean", "frac_reward_zero_std",
                     "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean"):  # fmt: skip
            assert mine[name] == pytest.approx(row[name], rel=1e-5, abs=1e-6), name
    assert any(r["grad_norm"] > 0 for r in ours)  # it trained
    exported = load_hf_state(convert_to_hf(ckpt, tmp_path / "hf"))
    for key, value in theirs.weights.items():
        torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=key)


def test_grpo_flags_are_checked_before_any_rank_waits(tiny_shards: Path, tmp_path: Path) -> None:
    from trainer.cli import config_from_args, parse_args

    prompts = prompt_file(tmp_path / "p.jsonl", 2)
    base = ["--rank", "0", "--model-name", str(tiny_shards), "--task-name", str(prompts)]
    grpo = [*base, "--objective", "grpo", "--reward-funcs", "tests.grpo_rewards:short", "--num-generations", "4"]
    cases = {
        (*grpo, "--batch-size", "6"): "--batch-size 6 is not a multiple of --num-generations 4",
        (*grpo, "--batch-size", "4", "--temperature", "0"): "at --temperature 0 every completion of a group",
        (*base, "--objective", "grpo"): "--objective grpo needs --reward-funcs",
        (*base, "--reward-funcs", "tests.grpo_rewards:short"): "--reward-funcs apply to --objective grpo",
        (*grpo, "--batch-size", "4", "--reward-funcs", "tests.grpo_rewards:none"): "tests.grpo_rewards has no none",
        (*grpo, "--batch-size", "4", "--reward-weights", "1", "2"): "--reward-weights gives 2 weights for 1",
        (*grpo, "--batch-size", "4", "--evaluation-data", str(prompts)): "does not evaluate held-out data yet",
        (*base, "--objective", "grpo", "--reward-funcs", "tests.grpo_rewards:short", "--num-generations", "1",
         "--batch-size", "4"): "--num-generations 1 with --scale-rewards group",
    }  # fmt: skip
    for flags, error in cases.items():
        with pytest.raises(ValueError) as caught:
            config_from_args(parse_args(list(flags)))
        assert error in str(caught.value), (flags, caught.value)
    cfg = config_from_args(
        parse_args([*grpo, "--batch-size", "8", "--temperature", "0.9", "--max-completion-length", "7"])
    )
    assert (cfg.objective.grpo.temperature, cfg.objective.grpo.max_completion_length) == (0.9, 7)


def test_completions_become_rows_at_their_slots_places() -> None:
    """Each completion through its EOS after its prompt, at its slot's rows of the global layout;
    under --mask-truncated-completions one cut at the length trains nothing."""
    from generation.engine import completions
    from generation.prompts import Prompt
    from objectives.rollouts import replica_prompts, training_rows

    draw = [Prompt(1, "a", (5, 6)), Prompt(2, "b", (7,)), Prompt(3, "c", (8, 9, 10)), Prompt(4, "d", (11,))]
    tokens = [torch.tensor([[20, 2, 0], [21, 22, 23]]), torch.tensor([[24, 2, 0], [2, 0, 0]])]  # EOS is 2
    made = completions(tokens, (2,))
    assert made == [([20, 2], False), ([21, 22, 23], True), ([24, 2], False), ([2], False)]
    for mask in (False, True):
        # batch size 2 (a prompt's group), slot 1 of 4: the second prompt's rows, 2 and 3
        prompts, places = replica_prompts(draw, 2, [1], 2)
        assert prompts == [draw[1], draw[1]] and places == [2, 3]
        ids, labels = training_rows(prompts, made[:2], places, mask, 8, 6, 0)
        assert ids[2].tolist() == [7, 20, 2, 0, 0, 0] and ids[3].tolist() == [7, 21, 22, 23, 0, 0]
        assert labels[2].tolist() == [IGNORE_INDEX, 20, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
        truncated = [IGNORE_INDEX] * 6 if mask else [IGNORE_INDEX, 21, 22, 23, IGNORE_INDEX, IGNORE_INDEX]
        assert labels[3].tolist() == truncated
        assert (labels[[0, 1, 4, 5, 6, 7]] == IGNORE_INDEX).all() and (ids[[0, 1, 4, 5, 6, 7]] == 0).all()


def test_the_recipe_s_math_reward_reads_the_last_number() -> None:
    from tests.helpers import ROOT

    reward = load_reward_function(f"{ROOT}/example_scripts/rewards/math_answer.py:correct_answer")
    said = ["So she has 1,234 apples.", [{"role": "assistant", "content": "3 + 4 = 7. The answer is 7"}], "no idea",
            "It is 7.5"]  # fmt: skip
    table = score([reward], ["q"] * 4, said, [[1]] * 4, {"answer": ["1234", "7", "3", None]})
    assert table[:, 0].tolist()[:3] == [1.0, 1.0, 0.0] and math.isnan(table[3, 0])
