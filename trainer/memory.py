"""Peak memory of a rank over one training step, for ``peak_mem_bytes`` in metrics.jsonl, and
the start-up estimate written beside it.

CUDA: the caching allocator's peak of allocated bytes (``max_memory_allocated``), reset each
step. CPU: the process's peak resident set (``VmHWM``), which Linux resets when "5" is written to
``/proc/self/clear_refs``; where that cannot be written the peak covers the whole run so far.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.precision import MASTER_DTYPE, compute_dtype

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger(__name__)
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._resettable = device.type == "cuda"
        if device.type == "cpu":
            try:
                _CLEAR_REFS.write_text("5")
                self._resettable = True
            except OSError as err:
                log.info("peak memory covers the whole run: cannot reset it here (%s)", err.strerror)

    def reset(self) -> None:
        """Start a new window: the next ``peak_bytes`` reports the highest use from now."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            _CLEAR_REFS.write_text("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        peak = _status_bytes("VmHWM") if self._resettable else None
        return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (reported in kB); None where absent."""
    try:
        lines = _STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def resident_bytes() -> int:
    """This process's resident set now (CPU); 0 where /proc is not there."""
    return _status_bytes("VmRSS") or 0


def _no_backward(_: None) -> torch.Tensor:
    raise RuntimeError("a probed forward keeps nothing for a backward")


def device_memory_bytes(device: torch.device) -> int:
    """All the memory of ``device``: a GPU's own, or this host's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


def probe_micro_batch(stage: torch.nn.Module, run_forward: Callable[[], torch.Tensor]) -> tuple[int, list[int]]:
    """What one micro-batch's forward leaves held for its backward, measured on a real forward
    (``run_forward``, without recomputation): the bytes of every tensor autograd saves (weights
    excluded, each storage once) plus the stage's output; and each block's share of them. The
    graph keeps nothing: it cannot be run backward, and it is freed as soon as it is dropped."""
    weights = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    seen: dict[int, int] = {}
    kept: list[torch.Tensor] = []  # alive until the end, so no address is reused and counted twice

    def pack(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        # Detached, and nothing handed to autograd: a saved output packed as itself would tie
        # the tensor and its own graph node in a cycle that is never freed.
        kept.append(tensor.detach())

    marks: list[int] = []
    handles = []
    for layer in stage.layers.values():
        handles.append(layer.register_forward_pre_hook(lambda *_: marks.append(sum(seen.values()))))
        handles.append(layer.register_forward_hook(lambda *_: marks.append(sum(seen.values()))))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _no_backward):
            out = run_forward()
        seen[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    finally:
        for handle in handles:
            handle.remove()
        kept.clear()
    blocks = [after - before for before, after in zip(marks[::2], marks[1::2], strict=True)]
    return sum(seen.values()), blocks


@dataclass(frozen=True)
class MemoryEstimate:
    """A stage's peak memory, estimated at start-up from what it holds and one probed micro-batch.

    Peak = process + weights + gradients + optimizer state + the larger of two phases:
    the pipeline pass (``in_flight`` micro-batches' held activations plus the ``workspace`` of
    one block's backward) and the update (``update``: the gradient sum's buffer and AdamW's
    temporaries, after the activations are freed).
    """

    process: int  # the bare process: CPU resident set before the stage was built; 0 on CUDA
    parameters: int
    gradients: int
    optimizer: int
    per_micro_batch: int
    in_flight: int
    workspace: int
    update: int

    @property
    def activations(self) -> int:
        return self.in_flight * self.per_micro_batch + self.workspace

    @property
    def total(self) -> int:
        return self.process + self.parameters + self.gradients + self.optimizer + max(self.activations, self.update)

    def describe(self) -> str:
        gb = lambda n: f"{n / 1e9:.3g} GB"  # noqa: E731
        return (
            f"process {gb(self.process)}, parameters {gb(self.parameters)}, gradients {gb(self.gradients)}, "
            f"optimizer {gb(self.optimizer)}, activations {gb(self.activations)} ({self.in_flight} micro-batches "
            f"of {gb(self.per_micro_batch)} + {gb(self.workspace)} backward workspace), update {gb(self.update)}: "
            f"peak about {gb(self.total)}"
        )


def estimate_memory(trainer: Trainer, process: int) -> MemoryEstimate:
    """The start-up estimate of ``trainer``'s stage's peak (``process``: the process's resident
    bytes before the stage was built): what it holds, and one micro-batch's
    forward probed on random input (its dropout draws are reseeded by the first step)."""
    cfg, topo, stage = trainer.cfg, trainer.topo, trainer.stage
    shape, vocab = trainer._activation_shape(), trainer.plan.model_config.vocab_size
    if topo.is_first_stage:
        x = torch.randint(vocab, shape[:2], device=trainer.device)
    else:
        x = torch.randn(shape, dtype=MASTER_DTYPE, device=trainer.device, requires_grad=True)
    targets = trainer.objective.probe_targets(shape[0], shape[1], vocab, trainer.device) if topo.is_last_stage else None
    loss_fn, compute = trainer._step_loss(1.0), compute_dtype(cfg.optim.precision)

    def forward() -> torch.Tensor:
        with torch.enable_grad(), torch.autocast(trainer.device.type, compute, enabled=compute is not None):
            out = stage(x)
            return loss_fn(out, targets) if targets is not None else out

    recompute, stage.recompute = stage.recompute, False
    try:
        held, blocks = probe_micro_batch(stage, forward)
    finally:
        stage.recompute = recompute
    ends, block = held - sum(blocks), max(blocks, default=0)
    if recompute:  # each block keeps its fp32 input; its backward recomputes the rest
        held = ends + len(blocks) * math.prod(shape) * MASTER_DTYPE.itemsize
        block *= 2
    in_flight = cfg.held_micro_batches(topo.stage)
    return MemoryEstimate(
        process=process,
        parameters=sum(p.nbytes for p in stage.parameters()) + trainer.objective.extra_bytes,
        gradients=sum(p.nbytes for p in trainer.params),
        optimizer=trainer.optimizer.state_bytes,
        per_micro_batch=held,
        in_flight=in_flight,
        workspace=max(block, ends),  # the backward's gradients of one block's (or the loss's) activations
        update=trainer.optimizer.update_bytes,
    )
