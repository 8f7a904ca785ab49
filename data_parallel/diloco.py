"""DiLoCo across data-parallel replicas (Douillard et al., 2023) and its streaming variant.

Each replica runs ``--sync-every`` (H) inner AdamW steps on its own slice of every global batch.
Then the replicas average their pseudo-gradients, the anchor (the weights all of them held at
the last sync) minus their own weights now, and every replica applies the same outer step to
the anchor: SGD with Nesterov momentum (``--outer-lr``, ``--outer-momentum``). The new anchor
becomes every replica's weights; the inner AdamW state stays each replica's own.

Streaming (``--diloco-fragments F``): block i belongs to fragment i % F (strided, so every
fragment spans the depth of the model), the embedding and the head to fragment 0 (so tied
copies on the two ends always sync together). Fragment f syncs after the steps
t = (f + 1) H / F (mod H): one fragment every H / F steps, each still every H steps, and the
link carries 1/F of the model at a time.

Overlap (``--diloco-overlap-steps`` tau): the sum runs on a background thread, on a second
data-parallel process group (``Communicator.side_channel``), beside the next tau inner steps;
the outer step lands after them, keeping the local progress they made on top:
weights = new anchor + (weights now - weights when sent). tau = 0 waits at once (DiLoCo as
published). Which fragment is in flight after a step follows from the step alone, so a
checkpoint stores the pending sum and the weights it was sent from, and a resumed run lands
it at the same step.

The last step lands what is pending and syncs every fragment at once, waiting: a run ends
with every replica on one model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from comm.compress import GradientCompressor
from comm.process_group import Communicator
from data_parallel.base import StepsAlone, Trained
from data_parallel.compressed import compressed_sum
from data_parallel.config import OUTER_PREFIX, DataParallelConfig
from modules import EMBEDDING_PART, HEAD_PART, SCORE_PART, layer_part
from pipeline.stage import Stage

OUTER_KEYS = ("anchor", "momentum")  # saved per trained parameter; the fragment in flight adds "sent" and "sum"
FEEDBACK_KEYS = ("residual", "chunk_residual")  # and --dp-compress its error feedback


def part_fragment(part: str, fragments: int, num_layers: int) -> int:
    """The fragment a stored part belongs to (module docstring)."""
    if part in (EMBEDDING_PART, HEAD_PART, SCORE_PART):
        return 0
    for i in range(num_layers):
        if part == layer_part(i):
            return i % fragments
    raise ValueError(f"{part} is no part of a {num_layers}-layer model")


def in_background(fn: Callable[..., object], *args: object) -> Future:
    """``fn(*args)`` on a thread of its own; the future holds its result or its exception (raised
    again where the result is read). A daemon: a run that stops on an error while a sync waits
    on a lost peer exits without waiting for it (the last step lands every sync of a clean run)."""
    result: Future = Future()

    def work() -> None:
        try:
            result.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed over to the reader of the result
            result.set_exception(err)

    threading.Thread(target=work, name="diloco-sync", daemon=True).start()
    return result


@dataclass
class _Sync:
    fragment: int
    lands_after: int  # the step after whose inner step the outer step lands
    result: Future  # the replicas' summed pseudo-gradient of the fragment, flat
    sent: list[torch.Tensor] | None  # this replica's weights when sent (None without overlap)


class DiLoCo:
    """The outer loop over one stage's trained parameters (module docstring)."""

    what = "DiLoCo state (outer anchor and momentum)"

    def __init__(self, cfg: DataParallelConfig, stage: Stage, params: list[torch.nn.Parameter], comm: Communicator,
                 tied: torch.nn.Parameter | None, num_layers: int, total_steps: int) -> None:  # fmt: skip
        self.cfg = cfg
        self.comm = comm
        self.side = comm.side_channel()
        self.replicas = comm.topo.data_size
        self.total_steps = total_steps
        self.interval = cfg.sync_every // cfg.fragments  # steps between two fragments' syncs
        trained = {id(p) for p in params}
        fragment_of: dict[int, int] = {}
        for part, module in stage.parts().items():
            for p in module.parameters():
                if id(p) in trained:
                    fragment_of.setdefault(id(p), part_fragment(part, cfg.fragments, num_layers))
        # a tied copy first: its sum is exact (compressed, the two ends would round apart)
        ordered = sorted(params, key=lambda p: p is not tied)
        self.fragments = [[p for p in ordered if fragment_of[id(p)] == f] for f in range(cfg.fragments)]
        self.tied = tied
        self.params = params
        with torch.no_grad():
            self.anchor = {id(p): p.detach().clone() for p in params}
            self.momentum = {id(p): torch.zeros_like(p) for p in params}
        compress = cfg.compress != "none" and self.replicas > 1
        self.compressors = [
            GradientCompressor(cfg.compress, cfg.topk_ratio) if compress else None for _ in self.fragments
        ]
        self.pending: _Sync | None = None
        self._landed_bytes = 0
        # error feedback read from a checkpoint, per parameter, until its fragment next syncs
        self._loaded_feedback: dict[int, dict[str, torch.Tensor]] = {}
        self.state_bytes = 8 * sum(p.numel() for p in params)  # anchor and momentum, fp32

    @property
    def dp_bytes_sent(self) -> int:
        """Bytes the syncs landed so far sent (read by the main thread: it sees a sync's bytes
        at the step it lands, however the worker thread was scheduled)."""
        return self._landed_bytes

    # -- the schedule ---------------------------------------------------------------------------

    def _starts(self, step: int) -> int | None:
        """The fragment whose sync starts after ``step``, if any (not the last step's, see after_step)."""
        if step % self.interval or step >= self.total_steps:
            return None
        return (step // self.interval - 1) % self.cfg.fragments

    def after_step(self, step: int) -> None:
        """Run the outer loop's part after inner step ``step``: land the sync due now, start the
        one due now (landing it at once without overlap); the last step syncs everything."""
        if self.pending is not None and (self.pending.lands_after == step or step == self.total_steps):
            self._land(self.pending)
            self.pending = None
        if step == self.total_steps:
            for f in range(self.cfg.fragments):
                self._land(self._start(f, step, overlap=False))
            return
        fragment = self._starts(step)
        if fragment is None:
            return
        sync = self._start(fragment, step, overlap=self.cfg.overlap > 0)
        if self.cfg.overlap:
            self.pending = sync
        else:
            self._land(sync)

    def _start(self, fragment: int, step: int, overlap: bool) -> _Sync:
        params = self.fragments[fragment]
        with torch.no_grad():
            delta = torch.cat([(self.anchor[id(p)] - p).reshape(-1) for p in params]) if params else None
            sent = [p.detach().clone() for p in params] if overlap else None
        if delta is None:  # nothing of this fragment on this stage (nor on its replicas)
            result: Future = Future()
            result.set_result(None)
        else:
            self._restore_feedback(fragment)
            result = in_background(self._sum, fragment, delta)
        return _Sync(fragment, step + (self.cfg.overlap if overlap else 0), result, sent)

    def _sum(self, fragment: int, delta: torch.Tensor) -> torch.Tensor:
        """The replicas' sum of ``delta`` (on the worker thread): in fp32, or compressed with
        error feedback, a tied copy (first) always exactly."""
        compressor = self.compressors[fragment]
        if compressor is None:
            self.side.all_reduce_data(delta)
            return delta
        exact = self.tied.numel() if self.fragments[fragment][0] is self.tied else 0
        if exact:
            self.side.all_reduce_data(delta[:exact])
        delta[exact:] = compressed_sum(self.side, compressor, delta[exact:]).to(delta)
        return delta

    def _land(self, sync: _Sync) -> None:
        """The outer Nesterov step on the anchor of ``sync``'s fragment, and the replica's new weights."""
        total = sync.result.result()
        self._landed_bytes = self.side.dp_bytes_sent
        if total is None:
            return
        mu, lr = self.cfg.outer_momentum, self.cfg.outer_lr
        mean = total / self.replicas
        offset = 0
        with torch.no_grad():
            for i, p in enumerate(self.fragments[sync.fragment]):
                grad = mean[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                buf, anchor = self.momentum[id(p)], self.anchor[id(p)]
                buf.mul_(mu).add_(grad)
                anchor.sub_(grad.add(buf, alpha=mu), alpha=lr)
                if sync.sent is None:
                    p.copy_(anchor)
                else:  # keep what the inner steps since the send added
                    p.add_(anchor - sync.sent[i])

    # -- checkpoints ----------------------------------------------------------------------------

    def _compressed(self, fragment: int) -> list[torch.nn.Parameter]:
        """The parameters a fragment's compressor sees, in its order (a tied copy is summed exactly)."""
        return [p for p in self.fragments[fragment] if p is not self.tied]

    def _feedback_of(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """``param``'s piece of its fragment compressor's error feedback (comm.compress.
        GradientCompressor): ``residual`` what this replica's encodes dropped; ``chunk_residual``
        (more than two replicas) what its chunk sums dropped, zero outside its chunk."""
        fragment = next((f for f, params in enumerate(self.fragments) if any(p is param for p in params)), None)
        compressor = self.compressors[fragment] if fragment is not None else None
        if compressor is None or compressor.residual is None or param is self.tied:
            return {}
        params = self._compressed(fragment)
        index = next(i for i, p in enumerate(params) if p is param)
        start = sum(p.numel() for p in params[:index])
        stop = start + param.numel()
        pieces = {"residual": compressor.residual[start:stop].view_as(param)}
        if compressor.chunk_residual is not None:  # this replica's chunk covers [first, first + length)
            length = compressor.chunk_residual.numel()
            first = self.comm.topo.replica * length
            piece = torch.zeros(param.numel(), dtype=compressor.chunk_residual.dtype, device=param.device)
            lo, hi = max(start, first), min(stop, first + length)
            if lo < hi:
                piece[lo - start : hi - start] = compressor.chunk_residual[lo - first : hi - first]
            pieces["chunk_residual"] = piece.view_as(param)
        return pieces

    def _restore_feedback(self, fragment: int) -> None:
        """Put error feedback loaded from a checkpoint back into the fragment's compressor."""
        compressor, params = self.compressors[fragment], self._compressed(fragment)
        if compressor is None or not all(id(p) in self._loaded_feedback for p in params):
            return
        pieces = [self._loaded_feedback.pop(id(p)) for p in params]
        numel = sum(p.numel() for p in params)
        padded = numel if self.replicas == 2 else self.replicas * compressor.chunk_length(numel, self.replicas)
        residual = torch.cat([piece["residual"].reshape(-1) for piece in pieces])
        compressor.residual = torch.nn.functional.pad(residual, (0, padded - numel))
        if "chunk_residual" in pieces[0]:
            chunks = torch.cat([piece["chunk_residual"].reshape(-1) for piece in pieces])
            length, mine = padded // self.replicas, self.comm.topo.replica
            compressor.chunk_residual = torch.nn.functional.pad(chunks, (0, padded - numel))[
                mine * length : (mine + 1) * length
            ].clone()

    def reset(self) -> None:
        """Start the outer loop from the weights now (a checkpoint without outer state)."""
        with torch.no_grad():
            for p in self.params:
                self.anchor[id(p)].copy_(p)
                self.momentum[id(p)].zero_()

    def state_tensors(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s outer state: anchor and momentum of each trained parameter, and for the
        fragment in flight the sum (waited for: the same whenever it is read) and the weights sent."""
        pending, pieces = self.pending, {}
        if pending is not None:
            total = pending.result.result()
            offset = 0
            for i, p in enumerate(self.fragments[pending.fragment]):
                pieces[id(p)] = (pending.sent[i], total[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        tensors = {}
        for name, p in module.named_parameters():
            if id(p) not in self.anchor:
                continue
            tensors[f"{name}.anchor"] = self.anchor[id(p)]
            tensors[f"{name}.momentum"] = self.momentum[id(p)]
            if id(p) in pieces:
                tensors[f"{name}.sent"], tensors[f"{name}.sum"] = pieces[id(p)]
            for key, value in self._feedback_of(p).items():
                tensors[f"{name}.{key}"] = value
        return tensors

    def load_state_tensors(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Restore ``module``'s part of what ``state_tensors`` saved at ``step``."""
        for name, p in module.named_parameters():
            if id(p) not in self.anchor:
                continue
            for key, store in zip(OUTER_KEYS, (self.anchor, self.momentum), strict=True):
                if f"{name}.{key}" not in tensors:
                    raise ValueError(f"no {key} for {name}: the file holds another model's outer state")
                store[id(p)].copy_(tensors[f"{name}.{key}"])
            if f"{name}.sum" in tensors:
                self._restore_pending(p, tensors[f"{name}.sent"], tensors[f"{name}.sum"], step)
            feedback = {k: tensors[f"{name}.{k}"] for k in FEEDBACK_KEYS if f"{name}.{k}" in tensors}
            if feedback:
                self._loaded_feedback[id(p)] = feedback

    def _restore_pending(self, param: torch.Tensor, sent: torch.Tensor, total: torch.Tensor, step: int) -> None:
        """One parameter's share of the sync in flight at ``step`` (the whole sum once all are in)."""
        if self.pending is None:
            started = step - step % self.interval
            fragment = self._starts(started)
            params = self.fragments[fragment]
            result: Future = Future()
            result.set_result(torch.zeros(sum(p.numel() for p in params), device=param.device))
            self.pending = _Sync(fragment, started + self.cfg.overlap, result, [torch.empty_like(p) for p in params])
        params = self.fragments[self.pending.fragment]
        index = next(i for i, p in enumerate(params) if p is param)
        offset = sum(p.numel() for p in params[:index])
        self.pending.sent[index].copy_(sent)
        self.pending.result.result()[offset : offset + param.numel()].copy_(total.reshape(-1))


class DiLoCoSync(StepsAlone):
    """--dp-mode diloco as a strategy: inner steps on each replica's own gradients, the outer
    loop (``DiLoCo``, this rank's ``outer`` state, saved as ``outer_<part>``) after each of them."""

    def __init__(self, cfg: DataParallelConfig, trained: Trained, comm: Communicator, device: torch.device,
                 stage: Stage, num_layers: int, total_steps: int) -> None:  # fmt: skip
        super().__init__(trained, comm, device)
        self.outer = DiLoCo(cfg, stage, self.params, comm, self.tied, num_layers, total_steps)
        self.own_state_bytes = self.outer.state_bytes

    def own_state(self) -> dict[str, DiLoCo]:
        return {OUTER_PREFIX: self.outer}

    @property
    def bytes_sent(self) -> int:
        return self.comm.dp_bytes_sent + self.outer.dp_bytes_sent  # its syncs go on a channel of their own

    def end_of_step(self, step: int) -> None:
        with self.comm.tracer.span("optimizer step", "outer step"):
            self.outer.after_step(step)
