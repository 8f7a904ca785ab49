"""--shard-optimizer (ZeRO stage 1): each replica keeps AdamW's state for 1/dp of its stage's values.

The trained parameters are views into one flat buffer, padded and cut into dp equal shards
(data_parallel.flat). Gradients are reduce-scattered, so each replica holds the sum for its own
shard only; it keeps AdamW's moments for that shard alone and steps it; the updated shards are
all-gathered back into every replica's weights. A reduce-scatter and an all-gather move the
bytes of one all-reduce. The shards hold whole norm pieces, so every weight is the same bit for
bit as without sharding; checkpoints hold the state as if unsharded, resumable by any topology.
"""

from __future__ import annotations

import torch

from comm.process_group import Communicator
from data_parallel.base import GradientSync, Trained, unscale
from data_parallel.flat import FlatLayout, piece_norm, squared_norm

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-value state, beside one step count
MASTER = torch.float32  # the shards are of the fp32 master weights


class Sharded(GradientSync):
    sharded = True

    def __init__(self, trained: Trained, comm: Communicator, device: torch.device) -> None:
        super().__init__(trained, comm, device)
        params = self.params
        if any(p.dtype != MASTER for p in params):
            raise ValueError("--shard-optimizer needs fp32 trained parameters (the master copy)")
        self.layout = layout = FlatLayout([p.numel() for p in params], comm.topo.data_size)
        # The weights and gradients become views into two flat buffers: the reduce-scatter reads
        # the gradients where backward accumulated them, the all-gather writes the weights in place.
        self.weights = torch.zeros(layout.padded, dtype=MASTER, device=device)
        self.grads = torch.zeros(layout.padded, dtype=MASTER, device=device)
        for p, offset in zip(params, layout.offsets, strict=True):
            view = self.weights[offset : offset + p.numel()]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view_as(p)
            p.grad = self.grads[offset : offset + p.numel()].view_as(p)
        self.start, self.stop = layout.shard_range(comm.topo.replica)
        # the reduce-scatter sums in place: this shard's slice of the gradient buffer gets the sum
        self.shard_grad = self.grads[self.start : self.stop]
        # the optimizer steps the shard as one parameter (a view of the flat weights; fused AdamW
        # takes no temporaries of the shard's size), its moments laid out here so that
        # checkpoints save and load them by flat position
        self.shard = torch.nn.Parameter(self.weights[self.start : self.stop])
        self.shard.grad = self.shard_grad
        self.stepped = [self.shard]
        self.moments = {key: torch.zeros(layout.shard_size, dtype=MASTER, device=device) for key in MOMENTS}
        self.sum_bytes = comm.scratch_bytes(layout.shard_size, MASTER.itemsize)  # the collectives' own
        self.index = {id(p): i for i, p in enumerate(params)}
        self._loaded_step: float | None = None  # set by the first part loaded from a checkpoint
        self.weight_decay, self.decay_runs = 0.0, []  # set by param_groups

    def param_groups(self, weight_decay: float) -> list[dict]:
        """One group, the shard, without the optimizer's own weight decay: the shard mixes values
        that decay with values that do not (biases, norms), so ``before_update`` decays the first
        kind itself, as AdamW would (it multiplies by 1 - lr * decay before its update: the same
        bits as the unsharded optimizer's)."""
        self.weight_decay = weight_decay
        runs = []  # the shard's ranges of values that decay
        for i in range(len(self.params)):
            _, _, lo, hi = self._overlap(i)
            if lo < hi and self.trained.decays(i):
                if runs and runs[-1][1] == lo - self.start:
                    runs[-1] = (runs[-1][0], hi - self.start)
                else:
                    runs.append((lo - self.start, hi - self.start))
        self.decay_runs = runs
        return [{"params": [self.shard], "weight_decay": 0.0}]

    def before_update(self, lr: float) -> None:
        if self.weight_decay:
            with torch.no_grad():
                for a, b in self.decay_runs:
                    self.shard[a:b].mul_(1 - lr * self.weight_decay)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        super().attach(optimizer)
        step = torch.zeros((), dtype=torch.float32, device=self.device)  # fused AdamW counts on the device
        optimizer.state[self.shard] = {"step": step, **self.moments}

    def zero_grad(self) -> None:
        self._check_views()
        self.grads.zero_()

    def _check_views(self) -> None:
        """Sharding relies on the parameters staying views of the flat buffers."""
        for p, offset in zip(self.params, self.layout.offsets, strict=True):
            if (
                p.data_ptr() != self.weights[offset:].data_ptr()
                or p.grad is None
                or (p.grad.data_ptr() != self.grads[offset:].data_ptr())
            ):
                raise RuntimeError(
                    "a trained parameter or its gradient was replaced after --shard-optimizer laid them out; "
                    "load weights with copy_ (load_state_dict), never by assigning .data or .grad"
                )

    def _overlap(self, index: int) -> tuple[int, int, int, int]:
        """Parameter ``index``'s flat range and its overlap with this shard: (begin, end, lo, hi)."""
        begin = self.layout.offsets[index]
        end = begin + self.layout.sizes[index]
        return begin, end, max(begin, self.start), min(end, self.stop)

    def reduce(self, totals: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce-scatter the gradients; then one small all-reduce carries the pieces' norms (each
        filled by the replica owning it, zeros elsewhere: the sum is exact) and the totals."""
        comm, grad = self.comm, self.shard_grad
        unscale([self.grads], scale)
        comm.reduce_scatter_data(grad, self.grads)  # in place (NCCL and Gloo allow it)
        totals = totals.reshape(-1).to(grad.device, torch.float64)
        pieces = len(self.layout.pieces)
        norms = torch.zeros(pieces + totals.numel(), dtype=torch.float64, device=grad.device)
        for k, (_, a, b) in enumerate(self.layout.pieces):
            if self.start <= a < self.stop:
                norms[k] = piece_norm(grad[a - self.start : b - self.start])
        # fp32 loss summed in float64 over two replicas is exact; rounded back, it is the fp32 sum
        norms[pieces:] = totals
        comm.all_reduce_data(norms)
        summed = norms[pieces:].to(torch.float32)
        return summed.cpu(), squared_norm(norms[:pieces], self.layout, self.skip)

    def after_update(self) -> None:
        """Every replica's updated shard into every replica's weights."""
        self._check_views()
        self.comm.all_gather_data_into(self.weights, self.weights[self.start : self.stop])

    def _step_count(self) -> torch.Tensor:
        return self.optimizer.state[self.shard]["step"]

    def state_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The state of ``module``'s parameters as if unsharded (a checkpoint any topology can
        resume). A collective: every replica calls it, part by part in the same order."""
        entries = [(name, self.index[id(p)]) for name, p in module.named_parameters() if id(p) in self.index]
        if not entries:
            return {}
        total = sum(self.layout.sizes[i] for _, i in entries)
        gathered = torch.zeros(len(MOMENTS), total, dtype=MASTER, device=self.weights.device)
        column = 0
        for _, i in entries:  # each parameter's overlap with this shard; zeros elsewhere
            begin, end, lo, hi = self._overlap(i)
            if lo < hi:
                for row, key in enumerate(MOMENTS):
                    gathered[row, column + lo - begin : column + hi - begin] = self.moments[key][
                        lo - self.start : hi - self.start
                    ]
            column += end - begin
        self.comm.all_reduce_data(gathered)  # each value comes from its one owner: the sum is exact
        tensors, column = {}, 0
        for name, i in entries:
            size = self.layout.sizes[i]
            for row, key in enumerate(MOMENTS):
                tensors[f"{name}.{key}"] = gathered[row, column : column + size].view_as(self.params[i]).clone()
            tensors[f"{name}.step"] = self._step_count().clone()
            column += size
        return tensors

    def load_state_tensors(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Take this shard's slice of ``module``'s saved state (saved by any topology). Every
        parameter of a stage must be at one step count (an unsharded run steps them together)."""
        for name, p in module.named_parameters():
            i = self.index.get(id(p))
            if i is None or f"{name}.step" not in tensors:
                continue
            step = float(tensors[f"{name}.step"])
            if self._loaded_step is not None and step != self._loaded_step:
                raise ValueError(
                    f"optimizer state of {name} is at step {step:g}, others at {self._loaded_step:g}; "
                    "--shard-optimizer needs one step count per stage: resume without it"
                )
            self._loaded_step = step
            self._step_count().fill_(step)
            begin, _, lo, hi = self._overlap(i)
            if lo < hi:
                for key in MOMENTS:
                    saved = tensors[f"{name}.{key}"].reshape(-1)[lo - begin : hi - begin]
                    self.moments[key][lo - self.start : hi - self.start] = saved
