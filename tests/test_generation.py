"""Generation through the pipeline (generation/), in one process: the stages of a split model run
the decode loop in threads joined by in-process links, and greedy output equals HF's ``generate``
token for token on the same left-padded micro-batches, for every family (sliding windows and
mixtures of experts included), with LoRA adapters on, rows ending at their own EOS and
micro-batches entering as others end. Sampling's filters equal HF's warpers; the sampled tokens
follow the seed, not the split. The sampling-only run through real ranks is tested with LoRA in
tests/test_lora.py and on a real model in tests/test_real_model.py."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import pytest
import torch

from comm.topology import Topology
from convert.from_hf import convert_from_hf
from convert.tiny_model import build_tiny_model
from data.chat import ChatTemplate
from generation.engine import PromptBatch, Stops, generate
from generation.prompts import read_prompts
from generation.sampling import Sampler, SamplingConfig, filtered_logits
from modules import family_for, load_config
from modules.lora import LoraSpec
from pipeline.stage import Stage
from tests.helpers import SEED, bundled_texts, peft_reference_model
from tests.test_lora import copy_adapters_into_peft
from trainer.cli import config_from_args, parse_args

FAMILIES = ("gptneox", "gptj", "gpt2", "llama", "llama_pad", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma",
            "gemma2", "gemma3", "mixtral", "qwen3_moe")  # fmt: skip
SPLIT = (range(0, 1), range(1, 3), range(3, 4))  # uneven: three stages, the middle one of two layers
NEW = 10
PAD = 0


class Answered:
    def __init__(self, take: object) -> None:
        self.take = take

    def wait(self) -> object:
        return self.take()


class QueueLinks:
    """One stage's decode links in one process: a queue per direction between two stages.
    A receive takes from its queue when waited for, which the loop does in the order it posts."""

    def __init__(self, stage: int, stages: int, queues: dict) -> None:
        self.topo = Topology(stage, stages, 1)
        self.queues = queues
        self.sent: list[tuple[str, bool]] = []

    def _queue(self, source: int, dest: int) -> queue.Queue:
        return self.queues.setdefault((source, dest), queue.Queue())

    def post_recv_hidden(self, shape: tuple[int, ...]) -> Answered:
        q = self._queue(self.topo.stage - 1, self.topo.stage)

        def take() -> tuple[torch.Tensor, bool]:
            hidden, done = q.get(timeout=120)
            assert hidden.shape == shape  # what the sender sent is what the receiver expects
            return hidden, done

        return Answered(take)

    def send_hidden(self, hidden: torch.Tensor, done: bool) -> Answered:
        self.sent.append(("hidden", done))
        self._queue(self.topo.stage, self.topo.stage + 1).put((hidden.detach().float().clone(), done))
        return Answered(lambda: None)

    def post_recv_tokens(self, rows: int) -> Answered:
        q = self._queue(self.topo.pipeline_size - 1, 0)
        return Answered(lambda: q.get(timeout=120))

    def send_tokens(self, ids: torch.Tensor, done: bool) -> Answered:
        self.sent.append(("tokens", done))
        self._queue(self.topo.stage, 0).put((ids.clone(), done))
        return Answered(lambda: None)


def generate_in_threads(
    stages: list[Stage], batches: list[PromptBatch], stops: Stops, sampling: SamplingConfig, seed: int = 0,
    in_flight: int = 2,
) -> tuple[list[torch.Tensor], list[QueueLinks]]:  # fmt: skip
    """Every stage's loop in its own thread; the last stage's tokens and every stage's links."""
    queues: dict = {}
    links = [QueueLinks(i, len(stages), queues) for i in range(len(stages))]
    results: list = [None] * len(stages)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        sampler = Sampler(sampling, seed, torch.device("cpu")) if i == len(stages) - 1 else None
        try:
            results[i] = generate(stages[i], links[i], batches, stops, sampler, in_flight)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    assert all(r is None for r in results[1:-1])  # the first stage has the tokens too: it trains on them
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[-1], strict=True))
    return results[-1], links


def split_stages(shards: Path, split: tuple[range, ...] = SPLIT) -> list[Stage]:
    config = load_config(shards)
    family = family_for(config.model_type)
    stages = [Stage(family, config, layers, i == 0, i == len(split) - 1) for i, layers in enumerate(split)]
    for stage in stages:
        stage.load_parts(str(shards))
        stage.eval()
    return stages


def prompt_batches(vocab: int) -> list[PromptBatch]:
    """Three micro-batches of prompts of unequal lengths (left padding in each), one of one row."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 6)]
    return [PromptBatch.left_padded(p, PAD, torch.device("cpu")) for p in (prompts[0:2], prompts[2:4], prompts[4:])]


def hf_greedy(model: torch.nn.Module, batch: PromptBatch, eos: list[int]) -> torch.Tensor:
    out = model.generate(batch.ids, attention_mask=batch.padding, max_new_tokens=NEW, do_sample=False,
                         eos_token_id=eos, pad_token_id=PAD)  # fmt: skip
    return out[:, batch.ids.shape[1] :]


def eos_that_ends_some_rows(model: torch.nn.Module, batches: list[PromptBatch]) -> list[int]:
    """A token HF's greedy output reaches mid-way in the first row (so that row ends early) and
    that the first batch's other row never produces (so it runs to the length)."""
    free = [hf_greedy(model, b, [PAD]) for b in batches]
    first, other = free[0][0].tolist(), set(free[0][1].tolist())
    candidates = [t for t in first[1 : NEW - 1] if t not in other and t != PAD]
    assert candidates, f"no token ends row 0 early but not row 1: {free[0]}"
    return [candidates[0]]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(f"gen_{request.param}")
    hf = build_tiny_model(root / "hf", bundled_texts(), request.param, num_layers=4, seed=1)
    return hf, convert_from_hf(hf, root / "shards")


def test_greedy_through_three_stages_equals_hf_generate(family_model: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    hf, shards = family_model
    stages = split_stages(shards)
    batches = prompt_batches(stages[0].config.vocab_size)
    reference = AutoModelForCausalLM.from_pretrained(hf, attn_implementation=stages[0].config._attn_implementation)
    reference.eval()
    eos = eos_that_ends_some_rows(reference, batches)
    expected = [hf_greedy(reference, b, eos) for b in batches]
    ours, links = generate_in_threads(stages, batches, Stops(tuple(eos), NEW, PAD), SamplingConfig(temperature=0))
    for want, got in zip(expected, ours, strict=True):
        assert torch.equal(got, want), (got, want)
    # the first row stopped early and was fed padding after, the second ran to the length
    assert expected[0][0, -1] == PAD and expected[0][1, -1] != PAD
    # each micro-batch's end went round once: the last stage said it beside its last tokens,
    # and the first and middle stages passed one done flag on each
    assert [done for kind, done in links[-1].sent].count(True) == len(batches)
    for stage_links in links[:-1]:
        assert [done for _, done in stage_links.sent].count(True) == len(batches)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_micro_batches_in_flight_change_nothing_but_the_order(in_flight: int, tmp_path: Path) -> None:
    """One in flight (each micro-batch alone) or all three: the same tokens."""
    from transformers import AutoModelForCausalLM

    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), "llama", num_layers=4, seed=1)
    stages = split_stages(convert_from_hf(hf, tmp_path / "shards"), (range(0, 2), range(2, 4)))
    batches = prompt_batches(stages[0].config.vocab_size)
    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    eos = eos_that_ends_some_rows(reference, batches)
    ours, _ = generate_in_threads(stages, batches, Stops(tuple(eos), NEW, PAD), SamplingConfig(temperature=0),
                                  in_flight=in_flight)  # fmt: skip
    for batch, got in zip(batches, ours, strict=True):
        assert torch.equal(got, hf_greedy(reference, batch, eos))


def test_lora_adapters_generate_as_peft(tmp_path: Path) -> None:
    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), "llama", num_layers=4, seed=1)
    shards = convert_from_hf(hf, tmp_path / "shards")
    stages = split_stages(shards, (range(0, 2), range(2, 4)))
    spec = LoraSpec(4, 8.0, 0.0, ())
    for stage in stages:
        stage.add_lora(spec, SEED)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: adapters that change the output
        for stage in stages:
            for name, param in stage.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            stage.eval()
    reference = peft_reference_model(hf, stages[0].lora, SEED).eval()
    copy_adapters_into_peft(stages, reference, "llama")
    batches = prompt_batches(stages[0].config.vocab_size)
    ours, _ = generate_in_threads(stages, batches, Stops((PAD,), NEW, PAD), SamplingConfig(temperature=0))
    with reference.disable_adapter():
        base = [hf_greedy(reference, b, [PAD]) for b in batches]
    adapted = [hf_greedy(reference, b, [PAD]) for b in batches]
    assert [torch.equal(got, want) for got, want in zip(ours, adapted, strict=True)] == [True] * len(batches)
    assert any(not torch.equal(a, b) for a, b in zip(adapted, base, strict=True))  # the adapters matter here


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 0.7), (5, 1.0, 1.0), (0, 0.8, 1.3), (7, 0.5, 0.9)])
def test_sampling_filters_equal_hf_warpers(top_k: int, top_p: float, temperature: float) -> None:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top-k boundary
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filtered_logits(logits, SamplingConfig(temperature, top_k, top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)], rtol=0, atol=0)
    assert torch.isinf(ours).any() == bool(top_k or top_p < 1)


def test_sampled_tokens_follow_the_seed_not_the_split(tmp_path: Path) -> None:
    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), "gpt2", num_layers=4, seed=1)
    shards = convert_from_hf(hf, tmp_path / "shards")
    sampling = SamplingConfig(temperature=1.5, top_k=40, top_p=0.95)
    stops = Stops((PAD,), NEW, PAD)
    batches = prompt_batches(load_config(shards).vocab_size)
    whole, _ = generate_in_threads(split_stages(shards, (range(0, 4),)), batches, stops, sampling, seed=5)
    split, _ = generate_in_threads(split_stages(shards), batches, stops, sampling, seed=5)
    other, _ = generate_in_threads(split_stages(shards), batches, stops, sampling, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(whole, other, strict=True))
    greedy, _ = generate_in_threads(split_stages(shards), batches, stops, SamplingConfig(temperature=0))
    assert not all(torch.equal(a, b) for a, b in zip(whole, greedy, strict=True))  # it did sample


def test_prompts_as_trl_holds_them(tiny_hf: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    path = tmp_path / "p.jsonl"
    messages = [{"role": "user", "content": "what is two and two"}]
    path.write_text(
        json.dumps({"prompt": "hello world", "answer": 4}) + "\n\n" + json.dumps({"prompt": messages}) + "\n"
    )
    prompts = read_prompts(path, tokenizer, ChatTemplate(tokenizer, template), 100)
    assert [p.line for p in prompts] == [1, 3]
    assert prompts[0].ids == tuple(tokenizer("hello world")["input_ids"]) and prompts[0].columns == {"answer": 4}
    rendered = "<user>what is two and two\n<assistant>"
    assert prompts[1].ids == tuple(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert prompts[1].prompt == messages


@pytest.mark.parametrize(
    "line,error",
    [
        ('{"prompt": "hi"', "line 1: not JSON (Expecting ',' delimiter at column 16)"),
        ('{"text": "hi"}', "line 1: no 'prompt' (a string, or a list of chat messages)"),
        ('{"prompt": 3}', "line 1: 'prompt' is a int; give a string or a list of messages"),
        ('{"prompt": [{"role": "user"}]}', "line 1: prompt message 0 is not a {'role': str, 'content': str} mapping"),
        ('{"prompt": "' + "word " * 40 + '"}', "more than --seq-length less --max-completion-length (8)"),
        ('{"prompt": [{"role": "user", "content": "hi"}]}', "the tokenizer has no chat template; pass --chat-template"),
    ],
)
def test_a_bad_prompt_is_one_line_naming_it(line: str, error: str, tiny_hf: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError) as caught:
        read_prompts(path, tokenizer, ChatTemplate(tokenizer), 8)
    assert error in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_sampling_flags_are_checked(tiny_shards: Path, tmp_path: Path) -> None:
    base = ["--rank", "0", "--model-name", str(tiny_shards)]
    exists = tmp_path / "out.jsonl"
    exists.write_text("kept\n")
    cases = {
        (): "--task-name is required: the data to train on (or --sample-prompts FILE to only sample)",
        ("--sample-prompts", "p.jsonl"): "--sample-prompts needs --sample-output FILE",
        ("--task-name", "d.jsonl", "--sample-output", "o.jsonl"): "--sample-output is where --sample-prompts writes",
        ("--sample-prompts", "p.jsonl", "--sample-output", str(exists)): f"--sample-output {exists} exists",
        ("--sample-prompts", "p.jsonl", "--sample-output", "o.jsonl", "--top-p", "0"): "--top-p must lie in (0, 1]",
        ("--sample-prompts", "p.jsonl", "--sample-output", "o.jsonl", "--temperature", "-1"): "--temperature must be",
    }
    for flags, error in cases.items():
        with pytest.raises(ValueError) as caught:
            config_from_args(parse_args([*base, *flags]))
        assert error in str(caught.value), (flags, caught.value)
    assert exists.read_text() == "kept\n"
    with pytest.raises(ValueError, match="an empty prompt cannot be continued"):
        PromptBatch.left_padded([[5], []], PAD, torch.device("cpu"))
