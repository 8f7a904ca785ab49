"""Which device a rank computes on, and where the tensors of each process group travel.

Device choice: under torchrun every process of a node gets ``LOCAL_RANK``, and process k takes
``cuda:k``, so ``--nproc-per-node 8`` spreads over a node's eight GPUs with no flag. An explicit
``--cuda-id`` wins (a launcher that starts one process per GPU itself, as
``example_scripts/launch_node.sh`` does). NCCL needs one GPU per rank; two ranks on one GPU are
found by the GPU's UUID (whatever ``CUDA_VISIBLE_DEVICES`` renumbered) and refused before any
NCCL communicator exists. Gloo lets ranks share a GPU.

Placement: NCCL moves CUDA tensors and Gloo CPU tensors. With CUDA compute over Gloo, every
tensor that crosses a Gloo group goes through host buffers: pinned, so the device-to-host and
host-to-device copies are asynchronous DMA, with one wait before Gloo reads what was copied out.

    compute (cuda) --copy, non-blocking--> pinned host buffer --Gloo--> pinned host buffer
                   <--copy, non-blocking--
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch


def choose_device(use_cuda: bool, cuda_id: int | None, local_rank: int | None, device_count: int) -> str:
    """``cpu`` or ``cuda:<i>``: ``--cuda-id`` if given, else torchrun's ``LOCAL_RANK``, else 0."""
    if not use_cuda:
        return "cpu"
    if device_count < 1:
        raise ValueError("--use-cuda true but no CUDA device is visible; use --use-cuda false to train on CPU")
    if cuda_id is not None:
        index, source = cuda_id, f"--cuda-id {cuda_id}"
    elif local_rank is not None and device_count == 1:
        index, source = 0, "the only visible device"  # a launcher gave each process its own GPU
    elif local_rank is not None:
        index, source = local_rank, f"LOCAL_RANK {local_rank} (set by torchrun)"
    else:
        index, source = 0, "the default --cuda-id 0"
    if not 0 <= index < device_count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{device_count} CUDA device(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
        raise ValueError(
            f"{source} asks for cuda:{index}, but this process sees {seen}; "
            f"pass --cuda-id 0..{device_count - 1} or start at most {device_count} processes on this node"
        )
    return f"cuda:{index}"


def device_identity(device: torch.device) -> str | None:
    """A name for the physical GPU behind ``device`` that is the same in every process (its
    UUID), or None on the CPU (where ranks may share the device)."""
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def check_one_gpu_per_rank(
    identities: Sequence[str | None],
    devices: Sequence[str],
    name: Callable[[int], str],
    groups: Sequence[Sequence[int]],
) -> None:
    """Raise a one-line ValueError naming the first two ranks of one of ``groups`` (the NCCL
    groups) that share a GPU: NCCL cannot run two members of a communicator on one device.
    ``identities[r]`` and ``devices[r]`` describe rank r."""
    for group in groups:
        owner: dict[str, int] = {}
        for rank in group:
            identity = identities[rank]
            if identity is None:
                continue
            if identity not in owner:
                owner[identity] = rank
                continue
            first = owner[identity]
            raise ValueError(
                f"{name(first)} on {devices[first]} and {name(rank)} on {devices[rank]} use the same GPU "
                f"({identity}); NCCL needs one GPU per rank: give each rank of a node its own --cuda-id "
                "(or launch with torchrun --nproc-per-node and no --cuda-id), or use --dist-backend gloo "
                "--dp-backend gloo to share a GPU"
            )


class Placement:
    """Where the wire tensors of one process group live, and the copies to get them there.

    ``staged`` (Gloo with a CUDA device; tests set it on the CPU to run this same path):
    outgoing tensors are copied into host buffers and received ones land in host buffers, then
    are copied to the compute device. Not staged: tensors go to the backend as they are.
    ``copies`` and ``bytes_staged`` count what went through the host buffers, both ways.
    """

    def __init__(self, device: torch.device, staged: bool) -> None:
        self.device = device
        self.staged = staged
        self.wire_device = torch.device("cpu") if staged else device
        self.pin = staged and device.type == "cuda"  # page-locked: the copies run as async DMA
        self.copies = 0
        self.bytes_staged = 0

    def buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor to receive into, where this group's backend writes."""
        return torch.empty(tuple(shape), dtype=dtype, device=self.wire_device, pin_memory=self.pin)

    def outgoing(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` where the backend reads them. Staged: all copies are queued first, then
        one wait, since Gloo reads the host buffers from the CPU as soon as it is handed them."""
        if not self.staged:
            return tensors
        host = [self.buffer(t.shape, t.dtype) for t in tensors]
        for h, t in zip(host, tensors, strict=True):
            h.copy_(t, non_blocking=self.pin)
            self._count(t)
        if self.pin:
            torch.cuda.current_stream(self.device).synchronize()
        return host

    def incoming(self, tensor: torch.Tensor) -> torch.Tensor:
        """A received ``tensor`` on the compute device (the copy is queued, not waited for: later
        work on the device's stream runs after it, and the pinned buffer stays alive until then)."""
        if not self.staged:
            return tensor
        self._count(tensor)
        return tensor.to(self.device, non_blocking=self.pin, copy=True)

    def copy_back(self, dest: torch.Tensor, wire: torch.Tensor) -> None:
        """Write a received ``wire`` tensor into ``dest`` on the compute device (in-place collectives)."""
        if wire is dest:
            return
        self._count(wire)
        dest.copy_(wire, non_blocking=self.pin)

    def _count(self, tensor: torch.Tensor) -> None:
        self.copies += 1
        self.bytes_staged += tensor.nbytes
