"""--dp-mode allreduce with buckets (the default): sums that leave while the last backward still runs.

A stage's trained gradients live in a few flat buffers, the buckets, filled in the reverse order
of the parameters (about the order a backward forms them); each parameter's ``.grad`` is a view
into its bucket, so a bucket is summed in place, with no copy in or out. During the step's last
backward (``pipeline.schedule.GradientWatch``) every accumulation finishes a gradient; once all
of a bucket's gradients are final it goes to the communicator's data-parallel lane
(``comm.lane``), which sums it over the replicas while the backward goes on with earlier layers.

Buckets leave in their fixed order (one complete before the bucket ahead of it waits for it),
so every replica issues the same collectives in the same order whatever order its backward
reached the parameters in. Under zb1 the linear layers' gradients are final only after the
last W; every other parameter's after the last B.

    stage's last backward:   head  layer 3  layer 2  layer 1  layer 0  embedding
    buckets sent:                  [head, 3]───────►  [2, 1]────────►  [0, emb]──► (wait)
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from comm.lane import Pending
from comm.process_group import Communicator
from data_parallel.allreduce import AllReduce
from data_parallel.base import Trained, unscale
from data_parallel.config import DataParallelConfig
from pipeline.schedule import GradientWatch

SumBucket = Callable[[int, torch.Tensor], None]  # (bucket index, its flat gradients): sum in place


class GradientBuckets:
    """The buckets of one stage's trained parameters and the watch over its last backward."""

    def __init__(self, params: list[torch.nn.Parameter], exclude: torch.nn.Parameter | None, bucket_bytes: int) -> None:
        """``exclude`` (a tied copy, summed exactly after the pipeline ends have added theirs)
        keeps a gradient of its own; every other parameter's gradient becomes a bucket's view."""
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in reversed(params):
            if p is exclude:
                continue
            if not self.buckets or self.buckets[-1][0].dtype != p.dtype or (size and size + p.nbytes > bucket_bytes):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.nbytes
        self.flats: list[torch.Tensor] = []
        self.bucket_of: dict[int, int] = {}
        for k, bucket in enumerate(self.buckets):
            flat = torch.zeros(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
            offset = 0
            for p in bucket:
                view = flat[offset : offset + p.numel()].view_as(p)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                offset += p.numel()
                self.bucket_of[id(p)] = k
                p.register_post_accumulate_grad_hook(self._autograd_accumulated)
            self.flats.append(flat)
        self.armed = False
        self.deferred: set[int] = set()
        self.final: set[int] = set()
        self.missing: list[int] = []
        self.sent: list[Pending] = []
        self.comm: Communicator | None = None
        self.sum_bucket: SumBucket | None = None

    def check_views(self) -> None:
        """The buckets are summed in place: every gradient must still be its bucket's view."""
        for bucket, flat in zip(self.buckets, self.flats, strict=True):
            offset = 0
            for p in bucket:
                if p.grad is None or p.grad.data_ptr() != flat[offset:].data_ptr():
                    raise RuntimeError(
                        "a trained parameter's gradient was replaced after the gradient buckets were laid out; "
                        "zero gradients in place (zero_grad(set_to_none=False)), never by assigning .grad"
                    )
                offset += p.numel()

    def start(self, comm: Communicator, sum_bucket: SumBucket) -> None:
        """A new step: nothing is final yet; ``sum_bucket`` will run on ``comm``'s lane."""
        self.check_views()
        self.comm, self.sum_bucket = comm, sum_bucket
        self.armed, self.deferred, self.final = False, set(), set()
        self.missing = [len(bucket) for bucket in self.buckets]
        self.sent = []

    # -- pipeline.schedule.GradientWatch ----------------------------------------------------------

    def arm(self, deferred: Collection[torch.Tensor]) -> None:
        self.armed = True
        self.deferred = {id(p) for p in deferred}

    def accumulated(self, params: tuple[torch.Tensor, ...]) -> None:
        for p in params:
            self._finished(p)

    def _autograd_accumulated(self, param: torch.Tensor) -> None:
        if self.armed and id(param) not in self.deferred:
            self._finished(param)

    # ---------------------------------------------------------------------------------------------

    def _finished(self, param: torch.Tensor) -> None:
        k = self.bucket_of.get(id(param))
        if k is None:
            return  # not trained here (a frozen bias beside a trained weight) or summed apart
        if id(param) in self.final:
            # Its bucket may be on the wire already: a sum without this share would be wrong.
            raise RuntimeError(
                "a gradient was accumulated twice in the step's last backward; its bucket may have been sent "
                "without the second share: run with --dp-bucket-mb 0 (summed after the step)"
            )
        self.final.add(id(param))
        self.missing[k] -= 1
        while len(self.sent) < len(self.buckets) and self.missing[len(self.sent)] == 0:
            self._send(len(self.sent))

    def _send(self, k: int) -> None:
        sum_bucket, flat = self.sum_bucket, self.flats[k]
        self.sent.append(self.comm.in_background(lambda: sum_bucket(k, flat)))

    def finish(self, last: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Send the buckets not sent yet (a parameter the last backward did not reach keeps its
        bucket, and those after it, here), then ``last`` after them on the lane; wait for all.
        Returns what ``last`` returns."""
        self.armed = False
        for k in range(len(self.sent), len(self.buckets)):
            self._send(k)
        tail = self.comm.in_background(last)
        for pending in self.sent:
            pending.wait()
        return tail.wait()


class Bucketed(AllReduce):
    """The sum of data_parallel.allreduce, in buckets summed during the last backward (module
    docstring), each compressed on its own under --dp-compress; a tied copy and the step's totals
    follow exactly as one message. With one replica left (an elastic run), nothing is summed."""

    def __init__(
        self, cfg: DataParallelConfig, trained: Trained, comm: Communicator | None, device: torch.device
    ) -> None:
        buckets = GradientBuckets(trained.params, trained.tied, cfg.bucket_bytes)
        super().__init__(cfg, trained, comm, device, messages=len(buckets.buckets))
        self.buckets = buckets
        # buckets are summed in place, so only a tied copy travels apart; compressed, the codec's temporaries
        if self.compressed is None:
            self.sum_bytes = self.tied.nbytes if self.tied is not None else 0

    def during_backward(self, scale: float) -> GradientWatch | None:
        """The buckets, whose sums start as the last backward finishes them (fp16: divided by the
        loss ``scale`` first); None while there is no other replica to sum with."""
        if self.replicas == 1:
            return None
        self.buckets.start(self.comm, lambda k, flat: self._sum_bucket(k, flat, scale))
        return self.buckets

    def _sum_bucket(self, k: int, flat: torch.Tensor, scale: float) -> None:
        """Bucket ``k``'s sum over the replicas, in place (on the communicator's lane)."""
        unscale([flat], scale)
        if self.compressed is not None:
            flat.copy_(self.compressed.sum(self.comm, k, flat))
        else:
            self.comm.all_reduce_data(flat)

    def reduce(self, totals: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.replicas == 1:
            return super().reduce(totals, scale)
        loss = totals.to(self.device).reshape(-1)
        tied = [self.tied.grad] if self.tied is not None else []
        unscale(tied, scale)  # the buckets divided their own before they were summed
        # the buckets are on their way; the tied copy and the loss follow as one message
        summed = self.buckets.finish(lambda: self._sum_exact(tied, loss))
        return summed.cpu(), self.squared_norm()
