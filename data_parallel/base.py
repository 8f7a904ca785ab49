"""The interface every data-parallel strategy implements, and what most of them share.

The step asks a strategy, in this order:

    zero_grad()              before the step's first micro-batch
    during_backward(scale)   a watch over the step's last backward (None: nothing starts there)
    reduce(totals, scale)    the gradients made ready for the update (summed over the replicas, or
                             this replica's own), the step's totals summed over the replicas, and
                             this stage's squared gradient norm
    before_update(lr)        then the optimizer steps ``stepped`` (in ``param_groups``), clipped
                             by the norm over every stage
    after_update()           once the optimizer stepped (a skipped step does not get here)
    end_of_step(step)        every step, updated or skipped

and ``rollback()`` when the step is skipped for non-finite gradients or a lost replica. Between
steps it gives its optimizer state per parameter (``state_tensors``, the same files whatever
the strategy or replica count) and the bytes it sent (``bytes_sent``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from comm.process_group import Communicator
from data_parallel.flat import FlatLayout, squared_norm
from pipeline.schedule import GradientWatch


def unscale(grads: Iterable[torch.Tensor], scale: float) -> None:
    """Gradients of an fp16 step back to true units (its loss was multiplied by ``scale``), before
    anything else reads them: sums, codecs, norms. Every strategy undoes the loss scale here."""
    if scale != 1.0:
        for grad in grads:
            grad.div_(scale)


class PartState(Protocol):
    """State a strategy keeps per trained parameter beside the optimizer's, saved and loaded part
    by part with the checkpoint (trainer.checkpoint names its files by ``own_state``'s prefix)."""

    what: str  # what it is, for a person reading the log

    def state_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor], step: int) -> None: ...

    def reset(self) -> None:
        """Start from the weights now: the checkpoint holds none of this state."""


@dataclass
class Trained:
    """A stage's trained parameters, as the strategies see them."""

    params: list[torch.nn.Parameter]
    # a tied copy (the embedding on both pipeline ends): its gradient is always summed exactly,
    # so the two ends' copies stay equal bit for bit
    tied: torch.nn.Parameter | None = None
    skip: int | None = None  # index in params of a copy whose norm the other end counts
    # indices in params of those weight decay applies to (trainer.optimizer.decayed_names: HF's
    # rule, biases and norm weights exempt); None: all of them
    decayed: frozenset[int] | None = None

    def decays(self, index: int) -> bool:
        return self.decayed is None or index in self.decayed


class GradientSync:
    """How a stage's gradients meet the other replicas' (module docstring: what the step asks)."""

    sharded = False  # the stage's optimizer state is split over its replicas
    replica_files = False  # every replica saves its own weights and optimizer state (they differ between syncs)

    def __init__(self, trained: Trained, comm: Communicator | None, device: torch.device) -> None:
        """``comm`` is None for a rank joining a live elastic run until the run takes it in (``use``)."""
        self.params = trained.params
        self.tied, self.skip = trained.tied, trained.skip
        self.trained = trained
        self.comm = comm
        self.device = device
        self.layout = FlatLayout([p.numel() for p in self.params], 1)
        self.stepped: list[torch.nn.Parameter] = self.params  # what the optimizer steps
        self.optimizer: torch.optim.Optimizer | None = None  # over ``stepped``, given by ``attach``
        self.sum_bytes = 0  # what a sum allocates for a moment, by its own count
        self.own_state_bytes = 0  # state it holds beside the optimizer's

    def own_state(self) -> dict[str, PartState]:
        """State of its own saved beside the optimizer's, by file prefix (DataParallelConfig.own_prefixes)."""
        return {}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The optimizer's parameter groups over ``stepped``: ``weight_decay`` on the parameters
        that decay (``Trained.decayed``), none on the others."""
        groups = [
            {"params": [p for i, p in enumerate(self.stepped) if self.trained.decays(i)], "weight_decay": weight_decay},
            {"params": [p for i, p in enumerate(self.stepped) if not self.trained.decays(i)], "weight_decay": 0.0},
        ]
        return [group for group in groups if group["params"]] or [{"params": [], "weight_decay": 0.0}]

    def before_update(self, lr: float) -> None:
        """Right before the optimizer steps at ``lr`` (a skipped step does not get here)."""

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer that steps ``stepped``."""
        self.optimizer = optimizer

    def use(self, comm: Communicator) -> None:
        """The process groups of a new generation of an elastic run."""
        self.comm = comm

    @property
    def replicas(self) -> int:
        return self.comm.topo.data_size

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to other replicas so far."""
        return self.comm.dp_bytes_sent

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def during_backward(self, scale: float) -> GradientWatch | None:
        return None

    def reduce(self, totals: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's ``totals`` summed over the replicas (on the CPU) and this stage's squared
        gradient norm, the gradients ready for the update in true units (fp16: divided by ``scale``)."""
        raise NotImplementedError

    def squared_norm(self) -> torch.Tensor:
        """This stage's squared gradient norm of the whole gradients (data_parallel.flat)."""
        norms = self.layout.norms([p.grad for p in self.params], self.device)
        return squared_norm(norms, self.layout, self.skip)

    def rollback(self) -> None:
        """The step was skipped: forget what it would have carried into the next one."""

    def after_update(self) -> None:
        """The optimizer has stepped ``stepped``."""

    def end_of_step(self, step: int) -> None:
        """Step ``step`` is over, updated or skipped."""

    def state_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The optimizer state of ``module``'s parameters by name (``<param>.<key>``)."""
        tensors, seen = {}, set()
        for name, param in module.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                if tensor.numel() and tensor.data_ptr() in seen:
                    tensor = tensor.clone()  # shared between parameters (bitsandbytes' qmaps): safetensors wants copies
                seen.add(tensor.data_ptr())
                tensors[f"{name}.{key}"] = tensor
        return tensors

    def load_state_tensors(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` gave (from any strategy and replica count)."""
        fused = self.optimizer.defaults.get("fused")
        for name, param in module.named_parameters():
            prefix = f"{name}."
            state: dict[str, object] = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    # A 0-d int64 was a plain int counter (bitsandbytes' step); torch's own optimizers
                    # keep counters as float tensors, which stay tensors: on the CPU, except that
                    # fused AdamW keeps them on its parameters' device.
                    plain = value.dim() == 0 and value.dtype == torch.int64
                    device = param.device if value.dim() or fused else value.device
                    state[key[len(prefix) :]] = int(value) if plain else value.to(device)
            if state:
                self.optimizer.state[param] = state


class StepsAlone(GradientSync):
    """Each replica steps on its own gradients (local SGD, DiLoCo): only the step's totals are
    summed, and reported as the replicas' mean; the replicas meet again in ``end_of_step``.
    Their weights differ between those meetings and their optimizer moments always: each
    replica saves its own files."""

    replica_files = True

    def reduce(self, totals: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss = totals.to(self.device).reshape(-1)
        unscale((p.grad for p in self.params), scale)
        if self.replicas == 1:
            summed = loss.detach()
        else:
            self.comm.all_reduce_data(loss)
            summed = loss.detach() / self.replicas  # the mean of the replicas' losses
        return summed.cpu(), self.squared_norm()
