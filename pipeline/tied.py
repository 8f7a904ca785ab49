"""A weight both ends of a pipeline hold: the input embedding tied to the output head.

When the two ends sit on one stage they share one tensor, as in the HF model. On different
stages each end holds a copy (``Stage.tied_copy``), and these rules keep the copies one weight:

- the copy: the head's copy starts as the embedding does (``Stage.init_parts``; loaded
  checkpoints hold one tensor for both), so the copies start equal;
- the ends' sum: after each backward both copies get the sum of both ends' gradients (over the
  ends' process group between ranks, ``sum_in_process`` in one process), so they stay equal;
- counted once: the first stage counts it in the gradient norm and the parameter count, the
  last stage's copy is left out (``TiedCopy.counted``, ``TiedCopy.norm_skip``);
- summed exactly across replicas: the data-parallel strategies keep it out of buckets and
  codecs (``data_parallel.base.Trained.tied``): a lossy sum would round the two ends apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.stage import Stage


class TiedCopy:
    """This stage's copy of a tied weight (``param``: None where the stage holds none, or both
    ends, or LoRA froze it) and its part in the rules above."""

    def __init__(self, stage: Stage) -> None:
        self.param = stage.tied_copy()
        self.counted_here = stage.embedding is not None  # the first stage's copy is the one counted

    def sum_ends(self, all_reduce_ends: Callable[[torch.Tensor], None]) -> None:
        """Both ends' copies get the sum of both gradients (``all_reduce_ends`` sums over the two ends)."""
        if self.param is not None:
            all_reduce_ends(self.param.grad)

    def counted(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """``params`` for sums over the pipeline (the gradient norm, the parameter count)."""
        return [p for p in params if not (p is self.param and not self.counted_here)]

    def norm_skip(self, params: list[nn.Parameter]) -> int | None:
        """The index in ``params`` of a copy that the other end counts, if this stage holds one."""
        if self.param is None or self.counted_here:
            return None
        return next(i for i, p in enumerate(params) if p is self.param)


def sum_in_process(copies: list[TiedCopy]) -> None:
    """The ends' sum when every stage runs in one process (pipeline.chain)."""
    held = [copy.param for copy in copies if copy.param is not None]
    if held:
        total = sum(param.grad for param in held)
        for param in held:
            param.grad = total.clone()
