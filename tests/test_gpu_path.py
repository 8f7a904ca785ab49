"""The CUDA path, checked on the CPU: device choice, one GPU per NCCL rank, Gloo through host
buffers, the residual stream kept in fp32 under autocast, and fp16 that cannot make progress.

The GPU itself is exercised by ``bash tests/gpu_smoke.sh`` (test_gpu_smoke_script below runs it
where CUDA exists, and its plumbing on the CPU everywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from comm.devices import Placement, check_one_gpu_per_rank, choose_device
from comm.process_group import nccl_groups
from comm.topology import Topology
from pipeline.schedule import MicroBatch, StepSpec, gpipe_step, one_f_one_b_step
from tests.helpers import (
    LR,
    OFFLINE_ENV,
    ROOT,
    SEED,
    SEQ,
    STEPS,
    WARMUP,
    assert_all_ok,
    free_port,
    hf_reference_training,
    launch,
    read_metrics,
    train_args,
)
from tests.toy_pipeline import LoopbackComm
from trainer.cli import config_from_args, parse_args

# -- which device a rank takes ------------------------------------------------------------------


def test_device_choice_follows_cuda_id_then_local_rank() -> None:
    assert choose_device(False, 3, 5, 8) == "cpu"
    assert choose_device(True, None, 5, 8) == "cuda:5"  # torchrun --nproc-per-node 8: process 5
    assert choose_device(True, 2, 5, 8) == "cuda:2"  # an explicit --cuda-id wins
    assert choose_device(True, None, None, 8) == "cuda:0"
    assert choose_device(True, None, 3, 1) == "cuda:0"  # each process was given its own GPU
    with pytest.raises(ValueError, match=r"LOCAL_RANK 4 .* asks for cuda:4, but this process sees 4 CUDA"):
        choose_device(True, None, 4, 4)
    with pytest.raises(ValueError, match=r"--cuda-id 9 asks for cuda:9.*--cuda-id 0..1"):
        choose_device(True, 9, None, 2)
    with pytest.raises(ValueError, match="no CUDA device is visible; use --use-cuda false"):
        choose_device(True, None, 0, 0)


def test_two_ranks_of_one_nccl_group_on_one_gpu_are_named_together() -> None:
    topo = Topology(0, 2, 2)
    devices = ["cuda:0 on a", "cuda:1 on a", "cuda:0 on b", "cuda:0 on b"]
    pipelines = [[0, 1], [2, 3]]
    check_one_gpu_per_rank(["GPU-a0", "GPU-a1", "GPU-b0", None], devices, topo.describe, pipelines)  # CPU: free
    # ranks 1 and 3 share a GPU but no NCCL group: only the data-parallel groups would hold both
    check_one_gpu_per_rank(["GPU-a0", "GPU-a1", "GPU-b0", "GPU-a1"], devices, topo.describe, pipelines)
    with pytest.raises(ValueError, match=r"rank 1 .* and rank 3 .* use the same GPU"):
        check_one_gpu_per_rank(["GPU-a0", "GPU-a1", "GPU-b0", "GPU-a1"], devices, topo.describe, [[0, 2], [1, 3]])
    with pytest.raises(ValueError) as err:
        check_one_gpu_per_rank(["GPU-a0", "GPU-a1", "GPU-b0", "GPU-b0"], devices, topo.describe, pipelines)
    message = str(err.value)
    assert "\n" not in message
    assert "rank 2 (stage 0, replica 1) on cuda:0 on b and rank 3 (stage 1, replica 1) on cuda:0 on b" in message
    assert "--cuda-id" in message and "--dist-backend gloo" in message


def test_nccl_groups_are_those_made_over_nccl() -> None:
    topo = Topology(0, 2, 2)
    assert nccl_groups(topo, "gloo", "gloo") == []  # several ranks may share a GPU over Gloo
    assert nccl_groups(topo, "gloo", "nccl") == [[0, 2], [1, 3]]
    assert nccl_groups(topo, "nccl", "gloo") == [[0, 1], [2, 3]]
    assert nccl_groups(Topology(0, 4, 1), "nccl", "nccl") == [[0, 1, 2, 3]]


def test_nccl_without_cuda_is_refused_by_the_flags(two_tasks: str) -> None:
    base = ["--model-name", "m", "--task-name", two_tasks, "--rank", "0", "--use-cuda", "false"]
    with pytest.raises(ValueError, match="--dp-backend nccl moves CUDA tensors only; add --use-cuda true"):
        config_from_args(parse_args([*base, "--dp-backend", "nccl"]))
    args = parse_args(base)
    assert args.cuda_id is None  # so torchrun's LOCAL_RANK can decide
    assert config_from_args(args).device == "cpu"


# -- Gloo through host buffers: the same code as CUDA compute over Gloo, on the CPU -------------


def _staged_rank(rank: int, port: int, out: str) -> None:
    import comm.process_group as process_group
    from comm.config import CommConfig
    from comm.p2p import Expected, Message
    from comm.process_group import Communicator

    torch.set_num_threads(1)
    topo = Topology(rank, 2, 2)  # ranks 0, 2: stage 0; ranks 1, 3: stage 1
    cfg = CommConfig(dist_url=f"tcp://127.0.0.1:{port}", host_staging=True, timeout_s=60)
    comm = Communicator.connect(topo, cfg, torch.device("cpu"), link_ends=True)
    seen: dict = {"staged": [comm.pp_place.staged, comm.dp_place.staged]}
    mark = float(10 * topo.replica + 1)
    shape = (2, 3)
    if topo.is_first_stage:
        comm.send_forward(Message(torch.full(shape, mark)), wait=False)
        comm.flush()
        received = comm.send_forward_recv_backward(Message(torch.full(shape, mark + 1)), Expected(shape, torch.float32))
        seen["exchange"] = received.tensor.tolist()
    else:
        seen["forward"] = comm.recv_forward(Expected(shape, torch.float32)).tensor.tolist()
        received = comm.send_backward_recv_forward(Message(torch.full(shape, -mark)), Expected(shape, torch.float32))
        seen["exchange"] = received.tensor.tolist()
    data = torch.tensor([float(rank)])
    comm.all_reduce_data(data)
    seen["data"] = data.tolist()
    gathered = comm.all_gather_data([torch.tensor([rank, rank], dtype=torch.int8), torch.tensor([rank * 0.5])])
    seen["gathered"] = [[t.tolist() for t in replica] for replica in gathered]
    pipe = torch.tensor([float(rank)])
    comm.all_reduce_pipeline(pipe)
    seen["pipeline"] = pipe.tolist()
    ends = torch.tensor([float(rank) + 0.25])
    comm.all_reduce_ends(ends)
    seen["ends"] = ends.tolist()
    seen["copies"] = [comm.pp_place.copies, comm.dp_place.copies]
    # Ranks 0 and 2 claim one GPU: every rank must refuse, naming both, before any NCCL group.
    process_group.device_identity = lambda device: "GPU-shared" if topo.stage == 0 else f"GPU-{rank}"
    try:
        comm._check_one_gpu_per_rank([[0, 2], [1, 3]])  # as if the data-parallel groups were NCCL's
    except ValueError as err:
        seen["shared_gpu"] = str(err)
    comm.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_gloo_tensors_travel_through_host_buffers(tmp_path: Path) -> None:
    mp.start_processes(_staged_rank, args=(free_port(), str(tmp_path)), nprocs=4, start_method="spawn")
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for rank, s in enumerate(seen):
        replica, stage = divmod(rank, 2)
        mark = 10 * replica + 1
        assert s["staged"] == [True, True]
        if stage == 0:
            assert s["exchange"] == [[-mark] * 3] * 2  # the gradient from stage 1
        else:
            assert s["forward"] == [[mark] * 3] * 2
            assert s["exchange"] == [[mark + 1] * 3] * 2
        assert s["data"] == [stage + (stage + 2)]  # summed over the two replicas of the stage
        assert s["gathered"] == [[[r, r], [r * 0.5]] for r in (stage, stage + 2)]
        assert s["pipeline"] == [2 * replica + 2 * replica + 1]
        assert s["ends"] == [4 * replica + 1 + 0.5]
        # Every tensor of every call crossed the host both ways: pipeline 7 (a send or receive,
        # an exchange, two all-reduces), data-parallel 8 (an all-reduce, a gather of two by two).
        assert s["copies"] == [7, 8]
        assert "rank 0 (stage 0, replica 0) on cpu" in s["shared_gpu"]
        assert "rank 2 (stage 0, replica 1) on cpu" in s["shared_gpu"]


def test_placement_without_staging_hands_tensors_through() -> None:
    place = Placement(torch.device("cpu"), staged=False)
    tensor = torch.ones(3)
    assert place.outgoing([tensor])[0] is tensor and place.incoming(tensor) is tensor
    assert place.copies == 0


# -- the residual stream under autocast ---------------------------------------------------------


class DtypeProbe(nn.Module):
    """A middle stage that records the dtype of the activations it computes on."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return x + self.linear(x)  # as a block: an fp32 stream plus a 16-bit update stays fp32


class SentDtypes(LoopbackComm):
    def __init__(self) -> None:
        super().__init__(1, 3)
        self.sent: list[torch.dtype] = []

    def send_forward(self, message, wait=True) -> None:
        self.sent.append(message.tensor.dtype)

    def send_backward(self, message, wait=True) -> None:
        self.sent.append(message.tensor.dtype)

    def send_forward_recv_backward(self, message, expected):
        self.sent.append(message.tensor.dtype)
        return super().send_forward_recv_backward(message, expected)

    def send_backward_recv_forward(self, message, expected):
        self.sent.append(message.tensor.dtype)
        return super().send_backward_recv_forward(message, expected)


@pytest.mark.parametrize("schedule", [gpipe_step, one_f_one_b_step])
def test_received_bf16_activations_compute_in_fp32(schedule) -> None:
    stage, comm = DtypeProbe(), SentDtypes()
    spec = StepSpec((2, 4, 8), torch.bfloat16, lambda y, micro: y.sum(), True, torch.bfloat16)
    schedule(stage, comm, [MicroBatch(None, None)] * 3, spec)
    assert stage.seen == [torch.float32] * 3  # the stream is back in fp32 before the stage computes
    assert comm.sent == [torch.bfloat16] * 6  # only the link carries 16 bits, both ways
    assert stage.linear.weight.grad is not None


@pytest.mark.ranks
def test_bf16_pipeline_is_as_close_to_hf_autocast_as_one_stage(
    tiny_hf: Path, tiny_shards: Path, two_tasks: str, tmp_path: Path
) -> None:
    """Measured here (tiny GPT-NeoX, 10 steps, largest |loss - HF under bf16 autocast|): pp=1
    1.1e-4, pp=2 2.5e-4: the stage boundary's one rounding to bf16, which on a model this small
    outweighs the rest (carrying bf16 on through stage 1 measured 2.3e-4). The test above pins
    the mechanism; this one bounds the whole path against HF."""
    reference, _, _ = hf_reference_training(
        tiny_hf, two_tasks, SEQ, SEED, 4, STEPS, LR, WARMUP, autocast=torch.bfloat16
    )
    gaps = {}
    for pp in (1, 2):
        ckpt = tmp_path / f"pp{pp}"
        args = train_args(tiny_shards, two_tasks, ckpt, pp=pp, dp=1, batch=4, micro=1, accum=1)
        assert_all_ok(launch([*args, "--bf16"], pp, tmp_path))
        losses = [r["loss"] for r in read_metrics(ckpt) if "loss" in r]
        assert len(losses) == STEPS
        gaps[pp] = max(abs(ours - ref) for ours, ref in zip(losses, reference, strict=True))
    assert gaps[1] < 5e-4, gaps
    assert gaps[2] <= 3 * gaps[1], gaps


# -- fp16 that cannot make progress stops -------------------------------------------------------


@pytest.mark.ranks
def test_fp16_overflowing_at_the_smallest_loss_scale_stops(tiny_shards: Path, two_tasks: str, tmp_path: Path) -> None:
    # A layer norm that lifts every value past fp16's largest (65504): the first linear layer
    # overflows in fp16 whatever the loss scale, as a model whose activations outgrew fp16 does.
    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    tensors = load_file(shards / "layer_0.safetensors")
    tensors["input_layernorm.weight"] = torch.full_like(tensors["input_layernorm.weight"], 1e5)
    save_file(tensors, shards / "layer_0.safetensors")
    ckpt = tmp_path / "ckpt"
    args = train_args(shards, two_tasks, ckpt, pp=1, dp=1, batch=2, micro=2, accum=1)
    flags = ["--fp16", "--loss-scale-init", "4", "--max-nonfinite-steps", "2", "--checkpoint-steps", "1"]
    (result,) = launch([*args, *flags], 1, tmp_path)
    assert result.returncode != 0, result.output[-2000:]
    assert "fp16 cannot make progress: 2 steps in a row (up to step 4) overflowed at the smallest loss scale" in (
        result.output
    ), result.output[-2000:]
    assert "--bf16" in result.output and "Traceback" not in result.output
    rows = read_metrics(ckpt)
    assert [r["loss_scale"] for r in rows] == [4, 2, 1]  # halved to the floor; step 4 failed there again
    assert all(r["skipped"] for r in rows)
    assert (ckpt / "latest").read_text().strip() == "3"  # saved steps stay; the stopping step saves none


# -- the GPU smoke check ------------------------------------------------------------------------


def _smoke(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV}
    cmd = ["bash", str(ROOT / "tests" / "gpu_smoke.sh"), "--workdir", str(tmp), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.ranks
def test_gpu_smoke_plumbing_on_cpu(tmp_path: Path) -> None:
    """The smoke check's cases run on the CPU (--cpu): what CI can check of the script itself."""
    done = _smoke(["--cpu", "--cases", "pp1-fp32,gloo-1f1b-bf16"], tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [line.split()[1].rstrip(":") for line in lines] == ["pp1-fp32", "gloo-1f1b-bf16"], done.stdout
    assert all(line.startswith("PASS") for line in lines), done.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: bash tests/gpu_smoke.sh needs one")
def test_gpu_smoke(tmp_path: Path) -> None:
    done = _smoke([], tmp_path)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]


def test_smoke_script_refuses_an_unknown_case(tmp_path: Path) -> None:
    done = _smoke(["--cpu", "--cases", "no-such-case"], tmp_path)
    assert done.returncode == 2 and "no case is named no-such-case" in done.stderr, done.stderr
