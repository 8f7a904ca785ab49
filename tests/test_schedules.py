"""1F1B and compression between stages: same training as GPipe, bounded memory, fewer bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from comm.compress import Codec
from comm.p2p import Message
from comm.trace import LANES, Tracer
from pipeline.schedule import StepSpec, gpipe_step, one_f_one_b_step, zero_bubble_step
from pipeline.weight_grad import deferred_weight_grads
from tests.helpers import assert_all_ok, compare_to_reference, launch, read_metrics, train_args
from tests.toy_pipeline import (
    HIDDEN,
    SEQ,
    TOY_SPEC,
    KeyedLoopbackComm,
    LoopbackComm,
    Posted,
    ToyBlocks,
    toy_micro_batches,
)


class CountingStage(nn.Module):
    """A stage whose live activations are counted: +1 per forward, -1 when its backward ran."""

    def __init__(self, first: bool) -> None:
        super().__init__()
        self.first = first
        self.embed = nn.Embedding(16, HIDDEN)
        self.linear = nn.Linear(HIDDEN, HIDDEN)
        self.live = self.peak = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(self.embed(x) if self.first else x)
        self.live += 1
        self.peak = max(self.peak, self.live)
        h.register_hook(self._released)
        return h

    def _released(self, grad: torch.Tensor) -> None:
        self.live -= 1


@pytest.mark.parametrize("stages,micro", [(4, 8), (3, 6), (2, 1)])
def test_1f1b_holds_at_most_p_minus_s_micro_batches(stages: int, micro: int) -> None:
    for s in range(stages):
        peaks = {}
        for name, schedule in (("gpipe", gpipe_step), ("1f1b", one_f_one_b_step), ("zb1", zero_bubble_step)):
            stage = CountingStage(first=s == 0)
            schedule(stage, LoopbackComm(s, stages), toy_micro_batches(s, stages, micro), TOY_SPEC)
            assert stage.live == 0  # every forward was backpropagated
            peaks[name] = stage.peak
        assert peaks["gpipe"] == micro
        assert peaks["1f1b"] == peaks["zb1"] == min(stages - s, micro), (s, peaks)


def compute_order(stage: nn.Module, s: int, stages: int, micro: int, schedule) -> list[str]:
    """The forward, backward and weight passes one stage runs, in order (from its trace)."""
    comm = LoopbackComm(s, stages)
    comm.tracer = Tracer(0)
    schedule(stage, comm, toy_micro_batches(s, stages, micro), TOY_SPEC)
    lanes = {LANES.index("forward compute"), LANES.index("backward compute")}
    return [e["name"] for e in comm.tracer.events if e["tid"] in lanes]


def test_zero_bubble_order_is_1f1b_with_each_w_s_backwards_late() -> None:
    assert compute_order(CountingStage(True), 0, 2, 4, zero_bubble_step) == \
        "F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3".split()  # fmt: skip
    assert compute_order(CountingStage(False), 1, 2, 4, zero_bubble_step) == \
        "F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3".split()  # fmt: skip
    for stages, micro in ((4, 8), (4, 2), (3, 5)):
        for s in range(stages):
            order = compute_order(CountingStage(s == 0), s, stages, micro, zero_bubble_step)
            plain = compute_order(CountingStage(s == 0), s, stages, micro, one_f_one_b_step)
            assert [e for e in order if e[0] != "W"] == plain  # forwards and backwards as in 1F1B
            assert [e for e in order if e[0] == "W"] == [f"W{k}" for k in range(micro)]
            for k in range(micro - s):  # W k right after B k+s: s backwards wait for their W
                assert order[order.index(f"B{k + s}") + 1] == f"W{k}", (stages, s, order)
            late = min(s + 1, micro)  # after the last backward: the W of the one s before it, then s held back
            assert order[-late - 1 :] == [f"B{micro - 1}"] + [f"W{k}" for k in range(micro - late, micro)]


def test_b_leaves_the_linear_weight_gradients_to_w() -> None:
    stage = ToyBlocks(first=False)
    store = deferred_weight_grads(stage)
    x = torch.randn(1, SEQ, HIDDEN, requires_grad=True)
    with store.deferring():
        stage(x).pow(2).sum().backward()
    deferred = (stage.up.weight, stage.up.bias, stage.conv.weight, stage.conv.bias, stage.down.weight)
    assert x.grad is not None and stage.norm.weight.grad is not None  # B: the input's and the norm's
    assert all(p.grad is None for p in deferred)
    store.run_oldest()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deferred)
    assert not store.pending


@pytest.mark.parametrize("compute", [None, torch.bfloat16])
def test_zero_bubble_gradients_equal_gpipe(compute: torch.dtype | None) -> None:
    stages, micro = 3, 5
    spec = StepSpec((1, SEQ, HIDDEN), compute or torch.float32, lambda out, micro: out.float().pow(2).mean(), True,
                    compute)  # fmt: skip
    for s in range(stages):
        grads = {}
        for name, schedule in (("gpipe", gpipe_step), ("zb1", zero_bubble_step)):
            stage = ToyBlocks(first=s == 0)
            torch.manual_seed(7)
            batches = toy_micro_batches(s, stages, micro)
            loss = schedule(stage, KeyedLoopbackComm(s, stages), batches, spec)
            grads[name] = ({n: p.grad for n, p in stage.named_parameters()}, loss)
        (reference, ref_loss), (ours, loss) = grads["gpipe"], grads["zb1"]
        assert reference.keys() == ours.keys() and all(g is not None for g in ours.values())
        for key, value in reference.items():
            # W adds each micro-batch's share inside its GEMM (addmm_), autograd adds a finished
            # product: the same sums, rounded apart (measured up to 3e-7 relative)
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=f"stage {s}: {key}")
        assert float(loss) == float(ref_loss)


class RecordingComm(LoopbackComm):
    """Records what one stage posts on each link and when it waits, as a program to replay."""

    def __init__(self, stage: int, stages: int) -> None:
        super().__init__(stage, stages)
        self.program: list[tuple] = []  # ("post", group, peer, ("send" | "recv", ...)) | ("wait", group)
        self._unflushed: list[int] = []

    def _post(self, peer: int, ops: tuple[str, ...]) -> int:
        group = len([e for e in self.program if e[0] == "post"])
        self.program.append(("post", group, peer, ops))
        return group

    def _recv(self, peer: int, expected) -> Posted:
        group = self._post(peer, ("recv",))
        return RecordedWait(self.program, group, Message(torch.randn(expected.shape, dtype=expected.dtype)))

    def post_recv_forward(self, expected):
        return Posted(None) if self.topo.is_first_stage else self._recv(self.topo.stage - 1, expected)

    def post_recv_backward(self, expected):
        return Posted(None) if self.topo.is_last_stage else self._recv(self.topo.stage + 1, expected)

    def _send(self, peer: int, wait: bool) -> None:
        group = self._post(peer, ("send",))
        if wait:
            self.program.append(("wait", group))
        else:
            self._unflushed.append(group)

    def send_forward(self, message, wait=True) -> None:
        if not self.topo.is_last_stage:
            self._send(self.topo.stage + 1, wait)

    def send_backward(self, message, wait=True) -> None:
        if not self.topo.is_first_stage:
            self._send(self.topo.stage - 1, wait)

    def _exchange(self, peer: int, expected) -> Message:
        self.program.append(("wait", self._post(peer, ("send", "recv"))))
        return Message(torch.randn(expected.shape, dtype=expected.dtype))

    def send_forward_recv_backward(self, message, expected):
        return None if self.topo.is_last_stage else self._exchange(self.topo.stage + 1, expected)

    def send_backward_recv_forward(self, message, expected):
        return None if self.topo.is_first_stage else self._exchange(self.topo.stage - 1, expected)

    def post_send_backward_recv_forward(self, message, expected):
        if self.topo.is_first_stage:
            return Posted(None)
        group = self._post(self.topo.stage - 1, ("send", "recv"))
        return RecordedWait(self.program, group, Message(torch.randn(expected.shape, dtype=expected.dtype)))

    def flush(self) -> None:
        self.program += [("wait", group) for group in self._unflushed]
        self._unflushed.clear()


class RecordedWait(Posted):
    def __init__(self, program: list[tuple], group: int, message: Message) -> None:
        super().__init__(message)
        self.program, self.group = program, group

    def wait(self) -> Message:
        self.program.append(("wait", self.group))
        return self.message


def replay_in_order(programs: list[list[tuple]]) -> None:
    """Run every stage's program by NCCL's rules, or fail naming the deadlock: the operations
    between two ranks run in the order posted (one stream per pair); the operations of one
    group run together; the k-th send from a to b meets the k-th receive at b from a."""
    n = len(programs)
    streams: dict[tuple[int, int], list[int]] = {}  # (rank, peer) -> groups not yet complete, in order
    ops: dict[tuple[int, int], list[list]] = {}  # (rank, group) -> [kind, message index, done]
    sent: dict[tuple[int, int], int] = {}  # messages posted per direction (a, b)
    complete: set[tuple[int, int]] = set()
    at = [0] * n
    while True:
        moved = False
        for r in range(n):  # each rank runs until it waits for a group that has not completed
            while at[r] < len(programs[r]):
                event = programs[r][at[r]]
                if event[0] == "wait" and (r, event[1]) not in complete:
                    break
                if event[0] == "post":
                    _, group, peer, kinds = event
                    entries = []
                    for kind in kinds:
                        direction = (r, peer) if kind == "send" else (peer, r)
                        entries.append([kind, sent.get((direction, kind), 0), False])
                        sent[(direction, kind)] = sent.get((direction, kind), 0) + 1
                    ops[r, group] = entries
                    streams.setdefault((r, peer), []).append(group)
                at[r] += 1
                moved = True
        for (a, b), queue in streams.items():  # heads of the two streams of a pair meet
            if not queue or not streams.get((b, a)):
                continue
            mine, theirs = ops[a, queue[0]], ops[b, streams[b, a][0]]
            for op in mine:
                partner = "recv" if op[0] == "send" else "send"
                for other in theirs:
                    if other[0] == partner and other[1] == op[1]:
                        op[2] = other[2] = True
        for (a, _), queue in streams.items():
            while queue and all(op[2] for op in ops[a, queue[0]]):
                complete.add((a, queue.pop(0)))
                moved = True
        if all(at[r] == len(programs[r]) for r in range(n)):
            return
        if not moved:
            stuck = {r: programs[r][at[r]] for r in range(n) if at[r] < len(programs[r])}
            raise AssertionError(f"deadlock under in-order links: ranks wait at {stuck}")


@pytest.mark.parametrize("schedule", [gpipe_step, one_f_one_b_step, zero_bubble_step])
@pytest.mark.parametrize("stages,micro", [(2, 1), (2, 4), (3, 2), (3, 6), (4, 3), (4, 8)])
def test_schedules_cannot_deadlock_on_in_order_links(schedule, stages: int, micro: int) -> None:
    programs = []
    for s in range(stages):
        comm = RecordingComm(s, stages)
        schedule(CountingStage(first=s == 0), comm, toy_micro_batches(s, stages, micro), TOY_SPEC)
        assert not comm._unflushed
        programs.append(comm.program)
    replay_in_order(programs)


def test_codecs_round_trip_within_their_precision() -> None:
    x = torch.randn(2, 16, 64) * torch.logspace(-2, 2, 16).reshape(1, 16, 1)  # tokens of very different scales
    errors = {}
    for name in ("none", "fp16", "bf16", "int8", "int4"):
        codec = Codec(name)
        wire = codec.encode(x)
        assert [(tuple(w.shape), w.dtype) for w in wire] == codec.wire(tuple(x.shape), x.dtype)
        y = codec.decode(wire, torch.float32)
        # scales per group: the error is relative to each token's own magnitude
        errors[name] = float(((y - x).abs().amax(-1) / x.abs().amax(-1)).max())
    assert errors["none"] == 0
    assert errors["fp16"] < 1e-3 and errors["bf16"] < 1e-2
    bf16_scale = 1 + 2**-8  # a scale rounded to bf16 may be this much coarser
    assert errors["int8"] <= bf16_scale * 0.5 / 127 and errors["int4"] <= bf16_scale * 0.5 / 7


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_group_that_does_not_divide_the_hidden_size_leaves_a_short_last_group(name: str) -> None:
    """576 (SmolLM2's hidden size) in groups of 128: four groups and one of 64 channels, each
    with its own scale; never one scale per token (which would flatten the small channels)."""
    x = torch.randn(3, 10, 576, generator=torch.Generator().manual_seed(2))
    x[..., :512] *= 50.0  # the last 64 channels are small: a shared scale would erase them
    codec = Codec(name, group=128, outliers=0)
    wire = codec.encode(x)
    assert [(tuple(w.shape), w.dtype) for w in wire] == codec.wire(tuple(x.shape), x.dtype)
    assert wire[1].shape == (3, 10, 5)  # 4 x 128 + 1 x 64 channels
    y = codec.decode(wire, torch.float32)
    levels = 127 if name == "int8" else 7
    bound = (1 + 2**-8) * 0.5 / levels  # half a step of each group's own scale (bf16-rounded)
    for lo, hi in ((0, 128), (384, 512), (512, 576)):
        group_max = x[..., lo:hi].abs().amax(-1)
        assert ((y - x)[..., lo:hi].abs().amax(-1) <= bound * group_max + 1e-6).all(), (lo, hi)
    per_token = Codec(name, group=576, outliers=0)
    lost = per_token.decode(per_token.encode(x), torch.float32)[..., 512:] - x[..., 512:]
    assert (y - x)[..., 512:].norm() * 5 < lost.norm()  # the short group keeps what one scale loses


def planted_outliers(channels: tuple[int, ...] = (5, 700), factor: float = 300.0) -> torch.Tensor:
    """Hidden states whose few channels are ``factor`` times the rest, on every token (as LLaMA's)."""
    x = torch.randn(2, 128, 1024, generator=torch.Generator().manual_seed(0))
    x[..., list(channels)] *= factor
    return x


def test_int4_keeps_the_channels_beside_an_outlier() -> None:
    x = planted_outliers()
    normal = torch.ones(x.shape[-1], dtype=torch.bool)
    normal[[5, 700]] = False
    errors, sizes = {}, {}
    for name, codec in (("per token", Codec("int4", group=0, outliers=0)), ("default", Codec("int4"))):
        wire = codec.encode(x)
        error = codec.decode(wire, torch.float32) - x
        errors[name] = (float(error.norm() / x.norm()), float(error[..., normal].norm() / x[..., normal].norm()))
        sizes[name] = sum(w.nbytes for w in wire) / (2 * 128)  # bytes a token
    # one scale per token: the other channels round to zero (all their signal lost)
    assert errors["per token"][1] > 0.95
    assert errors["default"][0] * 4 <= errors["per token"][0]
    assert errors["default"][1] * 4 <= errors["per token"][1]
    assert sizes["default"] <= 1.15 * sizes["per token"]  # 2 exact values and 32 bf16 scales a token


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    nearest = Codec("int4")
    biased = float((nearest.decode(nearest.encode(x), torch.float32) - x).abs().mean())
    codec = Codec("int4", stochastic=True)
    torch.manual_seed(2)
    draws = [codec.decode(codec.encode(x), torch.float32) for _ in range(400)]
    assert not torch.equal(draws[0], draws[1])  # really random
    assert float((sum(draws) / len(draws) - x).abs().mean()) * 5 < biased  # the mean converges to x


@pytest.mark.ranks
@pytest.mark.parametrize("mode", ["1f1b", "zb1"])
def test_1f1b_and_zb1_on_three_stages_match_hf(
    mode: str, tiny_hf: Path, tiny_shards: Path, mixed_tasks: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    args = [*train_args(tiny_shards, mixed_tasks, ckpt, pp=3, dp=1, batch=4, micro=1, accum=1), "--pp-mode", mode]
    assert_all_ok(launch(args, 3, tmp_path))
    compare_to_reference(tiny_hf, mixed_tasks, ckpt, per_step=4, tmp_path=tmp_path)


@pytest.mark.ranks
def test_compressed_activations_cut_bytes_and_keep_the_loss(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    """Bytes counted where they leave a rank. Gradients follow the activations' codec unless
    told otherwise: int8 for int8 and int4 activations, none for none."""
    runs = {}
    for name, flags in (("none", []), ("int8", ["--pp-compress", "int8"]), ("int4", ["--pp-compress", "int4"]),
                        ("int4 exact gradients", ["--pp-compress", "int4", "--pp-compress-grad", "none"])):  # fmt: skip
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        args = [*train_args(tiny_shards, two_tasks, folder / "ckpt", pp=2, dp=1, batch=4, micro=2, accum=1), *flags]
        assert_all_ok(launch(args, 2, folder))
        runs[name] = read_metrics(folder / "ckpt")
    hidden, tokens = 32, 2 * 32  # tiny model width; tokens per micro-batch (2 x seq 32)
    plain = 2 * tokens * hidden * 4  # 2 micro-batches one way, fp32
    positions = 2 * tokens * 4  # examples packed apart: the activations carry int32 positions, exact
    assert {r["comm_bytes"] for r in runs["none"]} == {2 * plain + positions}
    # a token: its values, one bf16 scale (32 channels are one group), activations 2 outliers
    # (int16 position, fp32 value); gradients none
    int8, int4 = 2 * tokens * (hidden + 2 + 2 * 6) + positions, 2 * tokens * (hidden // 2 + 2 + 2 * 6) + positions
    int8_grad = 2 * tokens * (hidden + 2)
    assert {r["comm_bytes"] for r in runs["int8"]} == {int8 + int8_grad}
    assert {r["comm_bytes"] for r in runs["int4"]} == {int4 + int8_grad}
    assert {r["comm_bytes"] for r in runs["int4 exact gradients"]} == {int4 + plain}
    for name in ("int8", "int4"):
        losses = [r["loss"] for r in runs[name]]
        assert losses == pytest.approx([r["loss"] for r in runs["none"]], rel=0.03), name
        assert losses != [r["loss"] for r in runs["none"]]  # really compressed


def run_on_emulated_link(shards: Path, tasks: str, tmp: Path, pp: int, dp: int, batch: int, mbps: int) -> list[dict]:
    """Metrics of a 3-step run whose ranks hold their sends to ``mbps`` with 20 ms latency."""
    ckpt = tmp / "ckpt"
    args = [*train_args(shards, tasks, ckpt, pp=pp, dp=dp, batch=batch, micro=2, accum=1),
            "--link-bandwidth-mbps", str(mbps), "--link-latency-ms", "20", "--total-steps", "3"]  # fmt: skip
    assert_all_ok(launch(args, pp * dp, tmp))
    return read_metrics(ckpt)


@pytest.mark.ranks
def test_link_emulation_holds_sends_to_the_rate(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    for row in run_on_emulated_link(tiny_shards, two_tasks, tmp_path, pp=2, dp=1, batch=4, mbps=2):
        # stage 0 sends half the bytes, one message per micro-batch, before stage 1 can finish
        floor = (row["comm_bytes"] / 2) * 8 / 2e6 + 2 * 0.020
        assert row["step_time_s"] >= floor, row


@pytest.mark.ranks
def test_link_emulation_holds_replica_traffic_too(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    for row in run_on_emulated_link(tiny_shards, two_tasks, tmp_path, pp=1, dp=2, batch=2, mbps=8):
        # the gradient sum (the whole model in fp32) leaves each replica at 8 Mbit/s
        assert row["dp_bytes"] > 200_000
        assert row["step_time_s"] >= row["dp_bytes"] * 8 / 8e6 + 0.020, row


@pytest.mark.ranks
def test_1f1b_accumulates_every_round_in_one_pipeline_pass(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    """--gradient-accumulate-step 2 under 1F1B: the pipeline fills and drains once per step
    (forwards F0..F3 of one pass), training bit for bit as one round of twice the batch does;
    GPipe keeps one pass per round (F0, F1 twice), so its held activations stay m micro-batches."""
    runs = {"1f1b accumulated": (2, 2, "1f1b"), "1f1b one round": (4, 1, "1f1b"), "gpipe accumulated": (2, 2, "gpipe")}
    forwards = {}
    for name, (batch, accum, mode) in runs.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        args = train_args(tiny_shards, two_tasks, folder / "ckpt", pp=2, dp=1, batch=batch, micro=1, accum=accum)
        assert_all_ok(
            launch([*args, "--pp-mode", mode, "--total-steps", "3", "--profiling", "tidy_profiling"], 2, folder)
        )
        events = json.loads((folder / "ckpt" / "trace" / "rank0.json").read_text())["traceEvents"]
        lane = LANES.index("forward compute")
        forwards[name] = sorted(e["name"] for e in events if e.get("ph") == "X" and e["tid"] == lane)
    assert forwards["1f1b accumulated"] == sorted(["F0", "F1", "F2", "F3"] * 3)
    assert forwards["gpipe accumulated"] == sorted(["F0", "F1"] * 6)
    one_pass, reference = tmp_path / "1f1b-accumulated" / "ckpt", tmp_path / "1f1b-one-round" / "ckpt"
    assert [r["loss"] for r in read_metrics(one_pass)] == [r["loss"] for r in read_metrics(reference)]
    for path in (reference / "checkpoint_3").glob("*.safetensors"):
        assert (one_pass / "checkpoint_3" / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.ranks
def test_zb1_with_recompute_fp16_and_sharded_optimizer_trains_as_1f1b(
    tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """W's closures hold what a recomputed block produced; fp16's scaled gradients and the sharded
    optimizer's gradient views (added to in place) come out as 1F1B's, over two accumulation rounds."""
    flags = ["--fp16", "--activation-checkpointing", "full", "--shard-optimizer", "--total-steps", "4"]
    for mode in ("1f1b", "zb1"):
        folder = tmp_path / mode
        folder.mkdir()
        args = train_args(tiny_shards, two_tasks, folder / "ckpt", pp=2, dp=2, batch=2, micro=1, accum=2)
        assert_all_ok(launch([*args, *flags, "--pp-mode", mode], 4, folder))
    rows = {mode: read_metrics(tmp_path / mode / "ckpt") for mode in ("1f1b", "zb1")}
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in rows["zb1"]] == pytest.approx([r[key] for r in rows["1f1b"]], rel=1e-5), key
    for path in (tmp_path / "1f1b" / "ckpt" / "checkpoint_4").glob("layer_*.safetensors"):
        ours, theirs = load_file(tmp_path / "zb1" / "ckpt" / "checkpoint_4" / path.name), load_file(path)
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)


def llama_with_outlier_channels(folder: Path, channels: tuple[int, ...] = (3, 40), factor: float = 100.0) -> Path:
    """A tiny untied LLaMA (hidden 64) whose embedding puts ``channels`` ``factor`` times above
    the rest, so every hidden state that crosses a link carries them, as LLaMA's do."""
    from transformers import AutoModelForCausalLM

    from convert.from_hf import convert_from_hf
    from convert.tiny_model import tiny_config, train_tokenizer
    from tests.helpers import bundled_texts

    tokenizer = train_tokenizer(bundled_texts())
    config = tiny_config("llama", len(tokenizer), num_layers=4, hidden=64, heads=4)
    config.tie_word_embeddings = False
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, list(channels)] *= factor
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    return convert_from_hf(folder / "hf", folder / "shards")


@pytest.mark.ranks
def test_int4_trains_through_outlier_channels_where_per_token_scales_do_not(two_tasks: str, tmp_path: Path) -> None:
    shards = llama_with_outlier_channels(tmp_path)
    per_token = ["--pp-compress-group", "0", "--pp-compress-outliers", "0"]
    runs = {"fp32": [], "int4": ["--pp-compress", "int4"], "int4 per token": ["--pp-compress", "int4", *per_token]}
    final = {}
    for name, flags in runs.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        args = train_args(shards, two_tasks, folder / "ckpt", pp=2, dp=1, batch=4, micro=2, accum=1)
        assert_all_ok(launch([*args, "--lr", "3e-3", *flags], 2, folder))
        rows = read_metrics(folder / "ckpt")
        final[name] = sum(r["loss"] for r in rows[-3:]) / 3  # the last steps' mean: less noise than one
    assert final["int4"] == pytest.approx(final["fp32"], rel=0.01), final
    assert final["int4 per token"] != pytest.approx(final["fp32"], rel=0.01), final
