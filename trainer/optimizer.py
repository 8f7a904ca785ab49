"""A stage's optimizer and how its gradients meet the other replicas' gradients.

Replicated (the default): every replica sums the full gradients (all-reduce, or the compressed
sums of --dp-compress) and runs the same AdamW over all of its stage's parameters. The sums go
in buckets that leave during the step's last backward (trainer.grad_buckets), unless
--dp-bucket-mb 0 sums everything in one message after the step.

Sharded (--shard-optimizer, ZeRO stage 1): the trained parameters are views into one flat
buffer, padded and cut into dp equal shards. Gradients are reduce-scattered, so each replica
holds the sum for its own shard only; it keeps AdamW's moments for that shard alone (1/dp of
them) and steps it; the updated shards are all-gathered back into every replica's weights.
A reduce-scatter and an all-gather move the bytes of one all-reduce.

Both measure the gradient norm the same way: one float64 norm per piece of a fixed cut of the
flat layout (each parameter cut at block boundaries that do not depend on dp), squared and
summed in a fixed order. The shards hold whole blocks, so a sharded replica computes exactly
the norms of its pieces, and the clipping coefficient, hence every weight, is the same bit for
bit as without sharding.
"""

from __future__ import annotations

import logging
import math
from itertools import accumulate

import torch

from comm.compress import GradientCompressor
from comm.process_group import Communicator
from pipeline.schedule import GradientWatch
from trainer.config import DataParallelConfig, OptimConfig
from trainer.grad_buckets import GradientBuckets
from trainer.precision import MASTER_DTYPE

log = logging.getLogger(__name__)
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-value state, beside one step count


def unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` back into ``tensors``."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def compressed_sum(comm: Communicator, compressor: GradientCompressor, packed: torch.Tensor) -> torch.Tensor:
    """The replicas' sum of ``packed`` through ``compressor`` (comm.compress.GradientCompressor):
    two replicas all-gather their payloads; more sum 1/n chunks in two compressed rounds, so
    each sends about two payloads' worth whatever n is, where an all-gather sends n - 1."""
    n = comm.topo.data_size
    if n == 2:  # the same bytes either way, and one rounding instead of two
        return compressor.decode_sum(comm.all_gather_data(compressor.encode(packed)), packed.numel())
    length = compressor.chunk_length(packed.numel(), n)
    parts = compressor.encode_parts(packed, n)
    # component j of every part, stacked: slice i goes to replica i, which sums chunk i
    received = comm.all_to_all_data([torch.stack(component) for component in zip(*parts, strict=True)])
    mine = compressor.decode_sum([[c[i] for c in received] for i in range(n)], length)
    gathered = comm.all_gather_data(compressor.encode_chunk_sum(mine))
    return torch.cat([compressor.decode_sum([payload], length) for payload in gathered])[: packed.numel()]


def make_optimizer(cfg: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (``adam`` is its alias) or bitsandbytes' 8-bit AdamW, imported only when asked for."""
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999), "eps": 1e-8}
    if cfg.optimizer != "8bit-adam":
        # Fused: one kernel per tensor instead of about ten passes over it and no temporaries
        # (measured 8x faster on the CPU); the same AdamW, to float rounding. Its step counts
        # live on the parameters' device.
        return torch.optim.AdamW(params, **kwargs, fused=bool(params))
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("--optimizer 8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit(params, **kwargs)


class FlatLayout:
    """Trained parameters end to end in one flat index space, cut into norm pieces and shards.

    The block size depends on the parameter count only (not on dp), so the pieces are the same
    in every topology of a stage; a shard is a whole number of blocks.
    """

    def __init__(self, sizes: list[int], shards: int) -> None:
        self.sizes = sizes
        self.offsets = [0, *accumulate(sizes)][:-1]
        self.total = sum(sizes)
        # ~64 blocks on a small stage, 2^20 values each (4 MB) on a large one: few pieces to
        # norm, and at most a block of padding per shard
        self.block = min(2**20, max(2**10, 1 << max(0, math.ceil(self.total / 64) - 1).bit_length()))
        blocks = max(1, math.ceil(self.total / self.block))
        self.shard_size = math.ceil(blocks / shards) * self.block
        self.padded = self.shard_size * shards
        self.pieces: list[tuple[int, int, int]] = []  # (parameter index, start, stop) in the flat space
        for index, (offset, size) in enumerate(zip(self.offsets, sizes, strict=True)):
            start = offset
            while start < offset + size:
                stop = min(offset + size, (start // self.block + 1) * self.block)
                self.pieces.append((index, start, stop))
                start = stop

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, (shard + 1) * self.shard_size


def piece_norm(values: torch.Tensor) -> torch.Tensor:
    """One piece's norm, accumulated in float64 (a piece is at most 2^20 values, so the cast
    costs 8 MB at most): an fp32 norm of a million gradients rounds by up to 1e-5 of it (on
    SmolLM2-135M, torch's fp32 norms put the step's gradient norm 2-4e-5 low)."""
    return torch.linalg.vector_norm(values, dtype=torch.float64)


def squared_norm(norms: torch.Tensor, layout: FlatLayout, skip: int | None) -> torch.Tensor:
    """Sum of the pieces' squared norms, in piece order, leaving out parameter ``skip``."""
    keep = [k for k, (index, _, _) in enumerate(layout.pieces) if index != skip]
    return norms[keep].pow(2).sum()


def adamw_temporaries(optimizer: torch.optim.Optimizer, sizes: list[int]) -> int:
    """Bytes AdamW allocates for a moment while it steps parameters of ``sizes`` bytes: fused,
    nothing; torch's multi-tensor kernels (CUDA's default otherwise) a square-root copy of every
    moment at once; one tensor at a time, two of that tensor's size."""
    if not sizes or optimizer.defaults.get("fused"):
        return 0
    return sum(sizes) if optimizer.defaults.get("foreach") else 2 * max(sizes)


class StageOptimizer:
    """What the trainer and checkpoints use of either kind below."""

    sharded: bool
    inner: torch.optim.Optimizer
    state_bytes: int  # the state it will hold once stepped, by its own count
    update_bytes: int  # what the gradient sum and the update allocate for a moment, by its own count

    def held_bytes(self) -> int:
        """Bytes of optimizer state this rank holds now, counted tensor by tensor."""
        return sum(v.nbytes for state in self.inner.state.values() for v in state.values() if torch.is_tensor(v))

    def _set_lr(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr

    def overlap(self, scale: float) -> GradientWatch | None:
        """What the step's last pipeline pass tells as it finishes gradients (None: nothing
        listens; the gradients are summed in ``reduce``, after the step)."""
        return None


class ReplicatedOptimizer(StageOptimizer):
    """Every replica holds the whole optimizer state of its stage (module docstring)."""

    sharded = False

    def __init__(self, cfg: OptimConfig, params: list[torch.nn.Parameter], comm: Communicator | None,
                 device: torch.device, dp: DataParallelConfig, tied: torch.nn.Parameter | None) -> None:  # fmt: skip
        self.params = params
        self.device = device
        self.comm = comm
        self.mode = dp.mode
        self.layout = FlatLayout([p.numel() for p in params], 1)
        self.inner = make_optimizer(cfg, params)
        moment_bytes = 2 if cfg.optimizer == "8bit-adam" else 8
        self.state_bytes = moment_bytes * self.layout.total
        # a rank joining an elastic run gets its comm later: it joins replicas
        summed = dp.mode == "allreduce" and (comm is None or comm.topo.data_size > 1)
        bucket_bytes = dp.bucket_bytes
        self.buckets = GradientBuckets(params, tied, bucket_bytes) if summed and bucket_bytes > 0 else None
        compress = summed and dp.compress != "none"
        # one compressor (error feedback) per message: each bucket, or the one sum after the step
        messages = len(self.buckets.buckets) if self.buckets is not None else 1
        self.compressors = [GradientCompressor(dp.compress, dp.topk_ratio) for _ in range(messages)] if compress else []
        # what the sum copies for a moment: the gradients as one flat message (or, compressed,
        # their temporaries); buckets are summed in place, and only a tied copy travels apart
        if not summed:
            copied = 0
        elif self.buckets is None or compress:
            copied = 4 * self.layout.total
        else:
            copied = tied.nbytes if tied is not None else 0
        self.update_bytes = max(copied, adamw_temporaries(self.inner, [p.nbytes for p in params]))

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=False)

    def _bucketed(self) -> bool:
        return self.buckets is not None and self.comm.topo.data_size > 1

    def overlap(self, scale: float) -> GradientWatch | None:
        """What the step's last pipeline pass tells as it finishes gradients, so their buckets
        are summed meanwhile (fp16: divided by the loss ``scale`` first); None when the sum
        waits for the step's end (no buckets, or no other replica now)."""
        if not self._bucketed():
            return None
        self.buckets.start(self.comm, lambda k, flat: self._sum_bucket(k, flat, scale))
        return self.buckets

    def _sum_bucket(self, k: int, flat: torch.Tensor, scale: float) -> None:
        """Bucket ``k``'s sum over the replicas, in place (on the communicator's lane)."""
        if scale != 1.0:
            flat.div_(scale)
        if self.compressors:
            flat.copy_(compressed_sum(self.comm, self.compressors[k], flat))
        else:
            self.comm.all_reduce_data(flat)

    def reduce(
        self, loss: torch.Tensor, tied: torch.nn.Parameter | None, skip: int | None, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the gradients (--dp-mode allreduce) and the loss over the replicas, gradients
        divided by the fp16 loss ``scale``; returns the summed loss and this stage's squared
        gradient norm without parameter ``skip``. ``loss`` may be a vector of the step's totals
        (the loss and the router loss): each is summed."""
        comm, device = self.comm, self.device
        loss = loss.to(device).reshape(-1)
        bucketed = self._bucketed()
        if scale != 1.0:  # back to true units before anything else sees them (compression included)
            for p in self.params:
                if not bucketed or p is tied:  # buckets divide their own before they are summed
                    p.grad.div_(scale)
        if comm.topo.data_size == 1:  # nothing to sum: no copy of the gradients either
            summed = loss.detach()
        elif self.mode != "allreduce":  # replicas step on their own gradients; only the loss is shared
            comm.all_reduce_data(loss)
            summed = loss.detach() / comm.topo.data_size  # the mean of the replicas' losses
        elif bucketed:
            # The buckets are on their way; a tied copy (summed exactly: compressed, the two ends
            # would round it apart) and the loss follow as one message.
            summed = self.buckets.finish(lambda: self._sum_exact([tied.grad] if tied is not None else [], loss))
        else:
            exact = [p.grad for p in self.params if not self.compressors or p is tied]
            summed = self._sum_exact(exact, loss)  # one message: the exact gradients and the loss
            if self.compressors:
                rest = [p.grad for p in self.params if p is not tied]
                packed = torch.cat([g.reshape(-1) for g in rest])
                unflatten(compressed_sum(comm, self.compressors[0], packed).to(packed), rest)
        grads = [p.grad.reshape(-1) for p in self.params]
        offsets = self.layout.offsets
        norms = [piece_norm(grads[i][a - offsets[i] : b - offsets[i]]) for i, a, b in self.layout.pieces]
        norms = torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64, device=device)
        return summed.cpu(), squared_norm(norms, self.layout, skip)

    def _sum_exact(self, grads: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """All-reduce ``grads`` (in place) and the loss (totals) as one message; returns the summed loss."""
        flat = torch.cat([*(g.reshape(-1) for g in grads), loss.to(grads[0] if grads else loss)])
        self.comm.all_reduce_data(flat)
        unflatten(flat[: -loss.numel()], grads)
        return flat[-loss.numel() :].detach()

    def rollback(self) -> None:
        for compressor in self.compressors:
            compressor.rollback()  # a skipped step must not poison the error feedback

    def step(self, lr: float, clip: float | None) -> None:
        if clip is not None:
            torch._foreach_mul_([p.grad for p in self.params], clip)
        self._set_lr(lr)
        self.inner.step()

    def state_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        tensors, seen = {}, set()
        for name, param in module.named_parameters():
            for key, value in self.inner.state.get(param, {}).items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                if tensor.numel() and tensor.data_ptr() in seen:
                    tensor = tensor.clone()  # shared between parameters (bitsandbytes' qmaps): safetensors wants copies
                seen.add(tensor.data_ptr())
                tensors[f"{name}.{key}"] = tensor
        return tensors

    def load_state_tensors(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name, param in module.named_parameters():
            prefix = f"{name}."
            state: dict[str, object] = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    # A 0-d int64 was a plain int counter (bitsandbytes' step); torch's own optimizers
                    # keep counters as float tensors, which stay tensors: on the CPU, except that
                    # fused AdamW keeps them on its parameters' device.
                    plain = value.dim() == 0 and value.dtype == torch.int64
                    fused = self.inner.defaults.get("fused")
                    device = param.device if value.dim() or fused else value.device
                    state[key[len(prefix) :]] = int(value) if plain else value.to(device)
            if state:
                self.inner.state[param] = state


class ShardedOptimizer(StageOptimizer):
    """Each replica holds AdamW's state for 1/dp of its stage's trained values (module docstring)."""

    sharded = True

    def __init__(self, cfg: OptimConfig, params: list[torch.nn.Parameter], comm: Communicator,
                 device: torch.device) -> None:  # fmt: skip
        if any(p.dtype != MASTER_DTYPE for p in params):
            raise ValueError("--shard-optimizer needs fp32 trained parameters (the master copy)")
        self.params = params
        self.comm = comm
        self.layout = layout = FlatLayout([p.numel() for p in params], comm.topo.data_size)
        # The weights and gradients become views into two flat buffers: the reduce-scatter reads
        # the gradients where backward accumulated them, the all-gather writes the weights in place.
        self.weights = torch.zeros(layout.padded, dtype=MASTER_DTYPE, device=device)
        self.grads = torch.zeros(layout.padded, dtype=MASTER_DTYPE, device=device)
        for p, offset in zip(params, layout.offsets, strict=True):
            view = self.weights[offset : offset + p.numel()]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view_as(p)
            p.grad = self.grads[offset : offset + p.numel()].view_as(p)
        self.start, self.stop = layout.shard_range(comm.topo.replica)
        # the reduce-scatter sums in place: this shard's slice of the gradient buffer gets the sum
        self.shard_grad = self.grads[self.start : self.stop]
        # AdamW steps the shard as one parameter (a view of the flat weights; fused, so it takes
        # no temporaries of the shard's size), its moments laid out here so that checkpoints save
        # and load them by flat position
        self.shard = torch.nn.Parameter(self.weights[self.start : self.stop])
        self.shard.grad = self.shard_grad
        self.moments = {key: torch.zeros(layout.shard_size, dtype=MASTER_DTYPE, device=device) for key in MOMENTS}
        self.inner = make_optimizer(cfg, [self.shard])
        step = torch.zeros((), dtype=torch.float32, device=device)  # fused AdamW counts on the device
        self.inner.state[self.shard] = {"step": step, **self.moments}
        self.state_bytes = 8 * layout.shard_size  # AdamW's two fp32 moments, of this shard only
        # AdamW's temporaries, then the collectives' own
        scratch = comm.scratch_bytes(layout.shard_size, MASTER_DTYPE.itemsize)
        self.update_bytes = max(adamw_temporaries(self.inner, [4 * layout.shard_size]), scratch)
        self.index = {id(p): i for i, p in enumerate(params)}
        self._loaded_step: float | None = None  # set by the first part loaded from a checkpoint

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

    def reduce(
        self, loss: torch.Tensor, tied: torch.nn.Parameter | None, skip: int | None, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce-scatter the gradients (divided by the fp16 loss ``scale``); then one small
        all-reduce carries the pieces' norms (each filled by the replica owning it, zeros
        elsewhere: the sum is exact) and the loss."""
        comm, grad = self.comm, self.shard_grad
        if scale != 1.0:
            self.grads.div_(scale)
        comm.reduce_scatter_data(grad, self.grads)  # in place (NCCL and Gloo allow it)
        totals = loss.reshape(-1).to(grad.device, torch.float64)
        pieces = len(self.layout.pieces)
        norms = torch.zeros(pieces + totals.numel(), dtype=torch.float64, device=grad.device)
        for k, (_, a, b) in enumerate(self.layout.pieces):
            if self.start <= a < self.stop:
                norms[k] = piece_norm(grad[a - self.start : b - self.start])
        # fp32 loss summed in float64 over two replicas is exact; rounded back, it is the fp32 sum
        norms[pieces:] = totals
        comm.all_reduce_data(norms)
        summed = norms[pieces:].to(torch.float32)
        return summed.cpu(), squared_norm(norms[:pieces], self.layout, skip)

    def rollback(self) -> None:
        pass  # nothing is compressed: --dp-compress is refused with sharding

    def step(self, lr: float, clip: float | None) -> None:
        self._check_views()
        if clip is not None:
            self.shard_grad.mul_(clip)
        self._set_lr(lr)
        self.inner.step()
        self.comm.all_gather_data_into(self.weights, self.weights[self.start : self.stop])

    def _step_count(self) -> torch.Tensor:
        return self.inner.state[self.shard]["step"]

    def state_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The state of ``module``'s parameters as if unsharded (a checkpoint any topology can
        resume). A collective: every replica calls it, part by part in the same order."""
        entries = [(name, self.index[id(p)]) for name, p in module.named_parameters() if id(p) in self.index]
        if not entries:
            return {}
        total = sum(self.layout.sizes[i] for _, i in entries)
        gathered = torch.zeros(len(MOMENTS), total, dtype=MASTER_DTYPE, device=self.weights.device)
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
