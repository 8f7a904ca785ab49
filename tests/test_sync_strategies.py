"""Each data-parallel strategy (data_parallel/) over n replicas simulated as threads of one process
(tests.replicas): what every replica holds after a step, against the sums computed here."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from data_parallel.allreduce import AllReduce
from data_parallel.base import GradientSync, Trained
from data_parallel.buckets import Bucketed
from data_parallel.choose import make_sync
from data_parallel.config import DataParallelConfig
from data_parallel.diloco import DiLoCoSync
from data_parallel.local_sgd import LocalSgd
from data_parallel.sharded import Sharded
from modules import EMBEDDING_PART, layer_part
from tests.replicas import ReplicaComm, ReplicaGroup, run_replicas
from trainer.config import OptimConfig
from trainer.optimizer import StageOptimizer

CPU = torch.device("cpu")
# 12272 values: 12 blocks of 1024 for the flat layout (13 norm pieces), so a shard of 2 or 3
# replicas holds 1/2 or 1/3 of them; the first is the tied copy (its norm counted elsewhere)
SHAPES = [(48, 64), (64, 80), (80,), (80, 50)]
TIED = 0
MICRO = 2  # backwards a step accumulates; the watch is armed for the last
TOTAL_STEPS = 20
OPTIM = OptimConfig(lr=1e-2, total_steps=TOTAL_STEPS)
BUCKET_MB = 0.01  # 10485 bytes: every trained parameter but the tied copy in a bucket of its own
EXACT = DataParallelConfig(bucket_mb=0)  # AllReduce: one exact sum after the step
CONFIGS = {
    "allreduce": EXACT,
    "bucketed": DataParallelConfig(bucket_mb=BUCKET_MB),
    "allreduce-int8": DataParallelConfig(bucket_mb=0, compress="int8"),
    "bucketed-int8": DataParallelConfig(bucket_mb=BUCKET_MB, compress="int8"),
    "sharded": DataParallelConfig(shard_optimizer=True),
    "local": DataParallelConfig(mode="local", sync_every=3),
    "diloco": DataParallelConfig(mode="diloco", sync_every=2, outer_lr=0.7, outer_momentum=0.9),
}


class Toy(nn.Module):
    """A stage's trained parameters, the same on every replica, in the parts DiLoCo asks for."""

    def __init__(self, weights: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        made = [nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]
        self.embedding = nn.ParameterList(made[:1])
        self.layers = nn.ModuleList([nn.ParameterList(made[1:3]), nn.ParameterList(made[3:])])
        if weights is not None:
            with torch.no_grad():
                for p, w in zip(self.parameters(), weights, strict=True):
                    p.copy_(w)

    def parts(self) -> dict[str, nn.Module]:
        return {EMBEDDING_PART: self.embedding, layer_part(0): self.layers[0], layer_part(1): self.layers[1]}


@dataclass
class Replica:
    comm: ReplicaComm | None
    model: Toy
    sync: GradientSync
    opt: StageOptimizer

    @property
    def replica(self) -> int:
        return self.comm.topo.replica if self.comm is not None else 0

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in self.model.parameters()]


def setup(
    comm: ReplicaComm | None, cfg: DataParallelConfig, weights: list[torch.Tensor] | None = None,
    optim: OptimConfig = OPTIM, decayed: frozenset[int] | None = None,
) -> Replica:  # fmt: skip
    model = Toy(weights)
    params = list(model.parameters())
    trained = Trained(params, tied=params[TIED], skip=TIED, decayed=decayed)
    sync = make_sync(cfg, trained, comm, CPU, model, num_layers=2, total_steps=TOTAL_STEPS)
    return Replica(comm, model, sync, StageOptimizer(optim, sync))


def micro_grads(replica: int, step: int, micro: int, scale: float = 1.0) -> list[torch.Tensor]:
    """The gradients replica ``replica``'s micro-batch ``micro`` of step ``step`` forms (times ``scale``)."""
    g = torch.Generator().manual_seed(7919 * step + 101 * replica + micro)
    return [torch.randn(shape, generator=g) * scale for shape in SHAPES]


def local_grads(replica: int, step: int) -> list[torch.Tensor]:
    """A replica's accumulated gradients of a step, added up as autograd accumulates them."""
    total = micro_grads(replica, step, 0)
    for m in range(1, MICRO):
        total = [a + b for a, b in zip(total, micro_grads(replica, step, m), strict=True)]
    return total


def summed_grads(n: int, step: int) -> list[torch.Tensor]:
    """The replicas' gradients summed in replica order (what an exact sum gives every replica)."""
    total = local_grads(0, step)
    for r in range(1, n):
        total = [a + b for a, b in zip(total, local_grads(r, step), strict=True)]
    return total


def totals_of(replica: int, step: int) -> torch.Tensor:
    """A replica's step totals: values whose sums are exact in fp32 and float64 alike."""
    return torch.tensor([1.25 * (replica + 1) + step, 64.0 + replica])


def squared_norm_of(grads: list[torch.Tensor]) -> torch.Tensor:
    return sum(g.double().pow(2).sum() for i, g in enumerate(grads) if i != TIED)


def backward(r: Replica, step: int, scale: float = 1.0) -> None:
    """The step's backwards as the schedule runs them: the watch armed for the last one."""
    r.opt.zero_grad()
    watch = r.opt.overlap(scale)
    for m in range(MICRO):
        if watch is not None and m == MICRO - 1:
            watch.arm(())
        grads = micro_grads(r.replica, step, m, scale)
        sum((p * g).sum() for p, g in zip(r.model.parameters(), grads, strict=True)).backward()


def train_step(r: Replica, step: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One step as trainer.loop runs it (one stage: its norm is the norm over every stage)."""
    backward(r, step, scale)
    totals, sq = r.opt.reduce(totals_of(r.replica, step), scale)
    clip = min(1.0, 1.0 / (float(sq) ** 0.5 + 1e-6))
    r.opt.step(OPTIM.lr_at(step), clip)
    r.sync.end_of_step(step)
    return totals, sq


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"{what}: tensor {i} differs by up to {(x - y).abs().max():g}"


def assert_replicas_agree(per_replica: list[list[torch.Tensor]], what: str) -> None:
    for r, tensors in enumerate(per_replica[1:], start=1):
        assert_same(tensors, per_replica[0], f"{what} of replica {r} vs replica 0")


# -- the choice ---------------------------------------------------------------------------------


def test_make_sync_builds_the_strategy_the_flags_ask_for() -> None:
    def made(cfg: DataParallelConfig, n: int | None) -> GradientSync:
        comm = ReplicaComm(ReplicaGroup(n), 0, ReplicaGroup(n)) if n is not None else None
        return setup(comm, cfg).sync

    assert type(made(CONFIGS["sharded"], 2)) is Sharded
    assert type(made(CONFIGS["local"], 2)) is LocalSgd
    assert type(made(CONFIGS["diloco"], 2)) is DiLoCoSync
    assert type(made(DataParallelConfig(), 2)) is Bucketed  # the default bucket size
    assert type(made(CONFIGS["bucketed"], 3)) is Bucketed
    assert len(made(CONFIGS["bucketed"], 2).buckets.buckets) == len(SHAPES) - 1  # the tied copy is apart
    assert type(made(EXACT, 2)) is AllReduce  # --dp-bucket-mb 0: one message after the step
    assert type(made(DataParallelConfig(), 1)) is AllReduce  # one replica: nothing to bucket
    assert type(made(DataParallelConfig(), None)) is Bucketed  # an elastic joiner sums once taken in
    assert made(CONFIGS["allreduce-int8"], 2).compressed is not None
    assert made(DataParallelConfig(compress="int8"), 1).compressed is None  # nothing to compress alone


# -- AllReduce ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_allreduce_sums_gradients_and_totals_over_the_replicas(n: int) -> None:
    def replica(comm: ReplicaComm):
        r = setup(comm, EXACT)
        assert type(r.sync) is AllReduce
        backward(r, 1)
        totals, sq = r.sync.reduce(totals_of(comm.topo.replica, 1), 1.0)
        return r.grads(), totals, sq, comm.dp_bytes_sent

    results = run_replicas(n, replica)
    expected = summed_grads(n, 1)
    for grads, totals, sq, sent in results:
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # summed in replica order: exact
        assert torch.equal(totals, sum(totals_of(r, 1) for r in range(n)))
        torch.testing.assert_close(sq, squared_norm_of(expected), rtol=1e-12, atol=0)
        assert sent > 0
    assert_replicas_agree([grads for grads, *_ in results], "summed gradients")
    assert len({float(sq) for _, _, sq, _ in results}) == 1


def test_one_replica_sends_nothing_and_keeps_its_gradients() -> None:
    def replica(comm: ReplicaComm):
        r = setup(comm, DataParallelConfig())  # the default: with one replica, no buckets
        assert r.opt.overlap(1.0) is None
        backward(r, 1)
        totals, sq = r.sync.reduce(totals_of(0, 1), 1.0)
        return r.grads(), totals, sq, comm.dp_bytes_sent, comm.group.calls[0]

    ((grads, totals, sq, sent, calls),) = run_replicas(1, replica)
    assert (sent, calls) == (0, 0)
    assert_same(grads, local_grads(0, 1), "one replica's gradients")
    assert torch.equal(totals, totals_of(0, 1))
    torch.testing.assert_close(sq, squared_norm_of(local_grads(0, 1)), rtol=1e-12, atol=0)


# -- fp16's loss scale --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("n", [2, 3])
def test_a_power_of_two_loss_scale_is_undone_exactly(kind: str, n: int) -> None:
    def replica(comm: ReplicaComm):
        out = []
        for scale in (1.0, 8.0):
            r = setup(comm, CONFIGS[kind])
            backward(r, 1, scale)
            totals, sq = r.opt.reduce(totals_of(comm.topo.replica, 1), scale)
            out.append((r.grads(), totals, sq))
        return out

    for r, ((grads, totals, sq), (grads8, totals8, sq8)) in enumerate(run_replicas(n, replica)):
        assert_same(grads8, grads, f"{kind}: replica {r}'s gradients at scale 8 vs 1")
        assert torch.equal(totals8, totals)
        assert torch.equal(sq8, sq), (float(sq8), float(sq))


# -- Bucketed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_buckets_are_summed_during_the_last_backward_and_equal_one_sum(n: int) -> None:
    bucket_bytes = 4 * sum(torch.Size(s).numel() for i, s in enumerate(SHAPES) if i != TIED)

    def replica(comm: ReplicaComm):
        out = {}
        for kind in ("allreduce", "bucketed"):
            r = setup(comm, CONFIGS[kind])
            sent_before = comm.dp_bytes_sent
            seen = []  # bytes sent when the first parameter's (the last bucket's) gradient arrives
            first = next(iter(r.model.layers[0].parameters()))
            handle = first.register_hook(
                lambda grad, seen=seen, before=sent_before: seen.append(comm.dp_bytes_sent - before)
            )
            backward(r, 1)
            handle.remove()
            during = comm.dp_bytes_sent - sent_before
            totals, sq = r.sync.reduce(totals_of(comm.topo.replica, 1), 1.0)
            out[kind] = (r.grads(), totals, sq, during, seen, getattr(r.sync, "buckets", None))
        return out

    for out in run_replicas(n, replica):
        grads, totals, sq, during, _, _ = out["allreduce"]
        b_grads, b_totals, b_sq, b_during, seen, buckets = out["bucketed"]
        assert during == 0  # AllReduce sends nothing before reduce
        assert len(buckets.buckets) == 3
        assert b_during == bucket_bytes  # every bucket went during the backward, the tied copy did not
        # the first micro-batch's backward (not armed) sent nothing; the last bucket's gradient
        # arrived after the earlier buckets had left
        assert seen[0] == 0
        assert 0 < seen[-1] < bucket_bytes
        assert_same(b_grads, grads, "bucketed vs one sum")
        assert torch.equal(b_totals, totals)
        assert torch.equal(b_sq, sq)


# -- compressed sums ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["allreduce-int8", "bucketed-int8"])
@pytest.mark.parametrize("n", [2, 3])
def test_int8_sums_the_tied_copy_exactly_and_the_rest_closely(kind: str, n: int) -> None:
    def replica(comm: ReplicaComm):
        r = setup(comm, CONFIGS[kind])
        backward(r, 1)
        totals, _ = r.opt.reduce(totals_of(comm.topo.replica, 1), 1.0)
        return r.grads(), totals

    results = run_replicas(n, replica)
    assert_replicas_agree([grads for grads, _ in results], f"{kind} sums")
    expected = summed_grads(n, 1)
    largest = max(g.abs().max() for r in range(n) for g in local_grads(r, 1))
    grads, totals = results[0]
    assert torch.equal(grads[TIED], expected[TIED])
    assert torch.equal(totals, sum(totals_of(r, 1) for r in range(n)))
    for i, (got, want) in enumerate(zip(grads, expected, strict=True)):
        if i == TIED:
            continue
        # each encode rounds a value by at most half its block's step (max / 127); more than two
        # replicas round the chunk sums once more
        error = (got - want).abs().max()
        assert 0 < error <= 2 * n * largest / 254, (i, float(error), float(largest))


@pytest.mark.parametrize("kind", ["allreduce-int8", "bucketed-int8"])
@pytest.mark.parametrize("n", [2, 3])
def test_a_rolled_back_step_leaves_no_error_feedback(kind: str, n: int) -> None:
    """Steps 1, 2 (rolled back), 3 sum at step 3 what steps 1, 3 do; without the rollback, not."""

    def replica(comm: ReplicaComm):
        out = {}
        for run, steps in {"rolled back": (1, 2, 3), "never happened": (1, 3), "kept": (1, 2, 3)}.items():
            r = setup(comm, CONFIGS[kind])
            for step in steps:
                backward(r, step)
                r.opt.reduce(totals_of(comm.topo.replica, step), 1.0)
                if step == 2 and run == "rolled back":
                    r.opt.rollback()
            out[run] = r.grads()
        return out

    results = run_replicas(n, replica)
    assert_replicas_agree([out["rolled back"] for out in results], "rolled back run")
    for out in results:
        assert_same(out["rolled back"], out["never happened"], f"{kind}: step 3 after a rolled-back step 2")
        assert not torch.equal(out["kept"][-1], out["never happened"][-1])  # the feedback matters


@pytest.mark.parametrize("kind", ["allreduce-int8", "bucketed-int8"])
def test_a_step_abandoned_before_its_sums_rolls_back_only_itself(kind: str) -> None:
    """A step given up before any sum (a pipeline peer lost in its forward, --spares) rolls
    back to its own start: step 1's error feedback survives, so steps 1, 2 (abandoned), 3 sum at
    step 3 what steps 1, 3 do."""

    def replica(comm: ReplicaComm):
        out = {}
        for run, steps in {"abandoned": (1, 2, 3), "never happened": (1, 3)}.items():
            r = setup(comm, CONFIGS[kind])
            for step in steps:
                if step == 2 and run == "abandoned":
                    r.opt.zero_grad()
                    r.opt.rollback()
                    continue
                backward(r, step)
                r.opt.reduce(totals_of(comm.topo.replica, step), 1.0)
            out[run] = r.grads()
        return out

    for out in run_replicas(2, replica):
        assert_same(out["abandoned"], out["never happened"], f"{kind}: step 3 after an abandoned step 2")


# -- Sharded ------------------------------------------------------------------------------------


def train(
    comm: ReplicaComm, kind: str, steps: range, start: tuple[list[torch.Tensor], dict] | None = None,
    optim: OptimConfig = OPTIM, decayed: frozenset[int] | None = None,
):  # fmt: skip
    """``steps`` of training from ``start`` (weights, state tensors); per replica: weights, the
    state tensors as saved, held bytes, each step's totals and squared norm."""
    r = setup(comm, CONFIGS[kind], start[0] if start else None, optim, decayed)
    if start is not None:
        r.opt.load_state_tensors(r.model, {k: v.clone() for k, v in start[1].items()})  # a file of its own
    reduced = [train_step(r, step) for step in steps]
    state = {k: v.clone() for k, v in r.opt.state_tensors(r.model).items()}
    return r.weights(), state, r.opt.held_bytes(), reduced


@pytest.mark.parametrize("n", [2, 3])
def test_sharded_steps_as_allreduce_with_1_nth_of_the_state(n: int) -> None:
    steps = range(1, 4)
    sharded = run_replicas(n, lambda comm: train(comm, "sharded", steps))
    plain = run_replicas(n, lambda comm: train(comm, "allreduce", steps))
    _, plain_state, plain_held, plain_reduced = plain[0]
    assert sorted(plain_state) == sorted(
        f"{name}.{key}" for name, _ in Toy().named_parameters() for key in ("step", "exp_avg", "exp_avg_sq")
    )
    for r, ((weights, state, held, reduced), (p_weights, *_)) in enumerate(zip(sharded, plain, strict=True)):
        assert_same(weights, p_weights, f"sharded vs allreduce weights on replica {r}")
        assert sorted(state) == sorted(plain_state)
        assert_same([state[k] for k in sorted(state)], [plain_state[k] for k in sorted(state)], "state tensors")
        for (totals, sq), (p_totals, p_sq) in zip(reduced, plain_reduced, strict=True):
            assert torch.equal(totals, p_totals)
            assert torch.equal(sq, p_sq), (float(sq), float(p_sq))
        # 12 blocks of 1024 values split evenly: 1/n of the moments, each replica one step count
        moments = 8 * sum(torch.Size(s).numel() for s in SHAPES)
        assert held == 8 * 12 * 1024 // n + 4, (held, plain_held)
        assert plain_held == moments + 4 * len(SHAPES)


@pytest.mark.parametrize("n", [2, 3])
def test_weight_decay_spares_the_exempt_parameters_sharded_or_not(n: int) -> None:
    """Weight decay on some parameters only (HF's rule exempts biases and norm weights): the
    shard, which mixes both kinds in one flat tensor, decays exactly the values the unsharded
    optimizer's groups do, bit for bit; an exempt parameter moves as without any decay."""
    steps, decayed = range(1, 4), frozenset({0, 1, 3})  # tensor 2 (80 values, a bias's shape) exempt
    decaying = OptimConfig(lr=1e-2, total_steps=TOTAL_STEPS, weight_decay=0.3)
    sharded = run_replicas(n, lambda comm: train(comm, "sharded", steps, optim=decaying, decayed=decayed))
    plain = run_replicas(n, lambda comm: train(comm, "allreduce", steps, optim=decaying, decayed=decayed))
    undecayed = run_replicas(n, lambda comm: train(comm, "allreduce", steps))
    for r in range(n):
        assert_same(sharded[r][0], plain[r][0], f"sharded vs allreduce weights under decay on replica {r}")
        for i, (with_decay, without) in enumerate(zip(plain[r][0], undecayed[r][0], strict=True)):
            assert torch.equal(with_decay, without) == (i not in decayed), i


def test_sharded_state_resumes_on_another_replica_count() -> None:
    weights, state, _, _ = run_replicas(3, lambda comm: train(comm, "sharded", range(1, 4)))[0]
    more = range(4, 7)
    sharded = run_replicas(2, lambda comm: train(comm, "sharded", more, (weights, state)))
    plain = run_replicas(2, lambda comm: train(comm, "allreduce", more, (weights, state)))
    for r in range(2):
        assert_same(sharded[r][0], plain[r][0], f"replica {r}'s weights resumed sharded over 2 vs unsharded")
        assert_same([sharded[r][1][k] for k in sorted(state)], [plain[r][1][k] for k in sorted(state)], "state")
    assert float(plain[0][1]["embedding.0.step"]) == 6
    assert not torch.equal(plain[0][0][1], weights[1])  # it did train on


# -- LocalSgd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_local_sgd_steps_alone_and_averages_every_sync_every_steps(n: int) -> None:
    def replica(comm: ReplicaComm):
        r = setup(comm, CONFIGS["local"])
        history, totals = [], []
        for step in range(1, 4):
            backward(r, step)
            summed, sq = r.opt.reduce(totals_of(comm.topo.replica, step), 1.0)
            totals.append(summed)
            r.opt.step(1e-2, min(1.0, 1.0 / (float(sq) ** 0.5 + 1e-6)))
            history.append((r.weights(), comm.dp_bytes_sent))
            r.sync.end_of_step(step)
        return history, r.weights(), totals

    results = run_replicas(n, replica)
    for step in (0, 1):  # steps 1 and 2: each replica on its own gradients, only the totals sent
        for r in range(1, n):
            assert not torch.equal(results[r][0][step][0][1], results[0][0][step][0][1])
        assert all(history[step][1] == (step + 1) * totals_of(0, 1).nbytes for history, _, _ in results)
    before = [history[2][0] for history, _, _ in results]  # each replica's weights before step 3's average
    mean = []
    for i in range(len(SHAPES)):
        total = before[0][i].clone()
        for r in range(1, n):
            total += before[r][i]
        mean.append(total / n)
    for _, after, totals in results:
        assert_same(after, mean, "weights after step 3")
        for step, summed in enumerate(totals, start=1):
            assert torch.equal(summed, sum(totals_of(r, step) for r in range(n)) / n)


# -- DiLoCo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_diloco_takes_the_outer_nesterov_step_on_the_mean_pseudo_gradient(n: int) -> None:
    cfg = CONFIGS["diloco"]
    lr, mu = cfg.outer_lr, cfg.outer_momentum
    numel = sum(torch.Size(s).numel() for s in SHAPES)

    def replica(comm: ReplicaComm):
        r = setup(comm, cfg)
        assert type(r.sync) is DiLoCoSync
        anchor = r.weights()
        seen = []  # per step: weights after the inner step, after end_of_step, bytes the syncs sent, totals
        for step in range(1, 5):
            backward(r, step)
            totals, sq = r.opt.reduce(totals_of(comm.topo.replica, step), 1.0)
            r.opt.step(1e-2, min(1.0, 1.0 / (float(sq) ** 0.5 + 1e-6)))
            inner = r.weights()
            r.sync.end_of_step(step)
            seen.append((inner, r.weights(), r.sync.outer.dp_bytes_sent, totals))
        return anchor, seen

    results = run_replicas(n, replica)
    anchor = results[0][0]
    momentum = None
    for step in range(1, 5):
        inner = [seen[step - 1][0] for _, seen in results]
        after = [seen[step - 1][1] for _, seen in results]
        synced = [seen[step - 1][2] for _, seen in results]
        for _, seen in results:  # the loss reported is the replicas' mean
            assert torch.equal(seen[step - 1][3], sum(totals_of(k, step) for k in range(n)) / n)
        if step % 2:  # an inner step alone: the replicas drift apart, nothing is synced
            assert synced == [4 * numel * (step // 2)] * n
            assert_same(after[0], inner[0], f"step {step}: weights without a sync")
            assert not torch.equal(after[1][1], after[0][1])
            continue
        assert synced == [4 * numel * (step // 2)] * n  # the sync sent every trained value once
        assert_replicas_agree(after, f"weights after step {step}'s outer step")
        mean_delta = [sum(anchor[i] - inner[r][i] for r in range(n)) / n for i in range(len(SHAPES))]
        if momentum is None:  # the first outer step, the buffer from zero: anchor - lr * (g + mu * g)
            momentum = mean_delta
            expected = [a - lr * (g + mu * g) for a, g in zip(anchor, mean_delta, strict=True)]
        else:  # Nesterov: buf = mu * buf + g; anchor - lr * (g + mu * buf)
            momentum = [mu * b + g for b, g in zip(momentum, mean_delta, strict=True)]
            expected = [a - lr * (g + mu * b) for a, g, b in zip(anchor, mean_delta, momentum, strict=True)]
        for i, (got, want) in enumerate(zip(after[0], expected, strict=True)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"step {step}, parameter {i}")
        anchor = after[0]


# -- the simulation itself ----------------------------------------------------------------------


def test_replicas_that_disagree_fail_instead_of_hanging() -> None:
    def mismatched(comm: ReplicaComm) -> None:
        if comm.topo.replica == 0:
            comm.all_reduce_data(torch.ones(4))
        else:
            comm.all_gather_data([torch.ones(4)])

    with pytest.raises(AssertionError, match="the replicas called"):
        run_replicas(2, mismatched)

    def one_fails(comm: ReplicaComm) -> None:
        if comm.topo.replica == 1:
            raise ValueError("replica 1 broke")
        comm.all_reduce_data(torch.ones(4))  # would wait for replica 1 forever

    with pytest.raises(ValueError, match="replica 1 broke"):
        run_replicas(3, one_fails)
