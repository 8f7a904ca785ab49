"""The routers' load-balancing loss of a mixture-of-experts model, across pipeline stages.

HF's model (``output_router_logits`` on) adds ``router_aux_loss_coef * aux`` to the loss, where
over the router logits of every MoE layer l and token t of the micro-batch, E experts, top k:

    p[l,t] = softmax(logits[l,t])          count[e] = #{(l,t): e among the top k of p[l,t]}
    prob[e] = sum_{l,t} p[l,t,e]           R = (MoE layers) x (tokens)
    aux = E * sum_e (count[e] / R) * (prob[e] / R)

Two means over all layers' tokens multiplied: not a sum over layers, so no stage can compute its
share alone. Each stage adds its layers' ``count``, ``prob`` and rows to the running sums it
received (``BalanceStats``: 2E + 1 fp32 values that travel exactly beside the activations), in
layer order as HF adds them, and the last stage forms ``aux``. ``prob`` keeps its autograd
history: the received sums are a leaf that requires grad, so the last stage's gradient of
``aux`` with respect to them travels back beside the activations' gradient and reaches every
router. The counts come from a top-k and carry no gradient, as in HF.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoadBalance:
    """What the loss needs of a model: its router modules (HF's class, and the position of the
    logits in their output, as HF's own recorder finds them), experts, top k and coefficient."""

    router: type
    index: int
    experts: int
    top_k: int
    coef: float

    @property
    def size(self) -> int:
        """fp32 values a pipeline message carries beside the activations: count, prob, rows."""
        return 2 * self.experts + 1

    def start(self, device: torch.device | str) -> torch.Tensor:
        """The sums before the first layer (what the first stage starts from)."""
        return torch.zeros(self.size, dtype=torch.float32, device=device)

    @contextmanager
    def recording(self, module: nn.Module) -> Iterator[list[torch.Tensor]]:
        """The router logits of every router inside ``module``, in the order they run, while the
        context is open (so a recomputation in the backward, which runs later, adds nothing)."""
        logits: list[torch.Tensor] = []
        hooks = [
            sub.register_forward_hook(lambda _module, _args, out: logits.append(out[self.index]))
            for sub in module.modules()
            if isinstance(sub, self.router)
        ]
        try:
            yield logits
        finally:
            for hook in hooks:
                hook.remove()

    def add(self, sums: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        """``sums`` (count, prob, rows) with ``logits``' layers added in order, as HF's
        ``load_balancing_loss_func`` adds them (no attention mask: every token is real)."""
        e = self.experts
        count, prob, rows = sums[:e], sums[e : 2 * e], sums[2 * e :]
        for layer in logits:
            weights = torch.softmax(layer, dim=-1)  # (tokens, experts), in the logits' dtype as HF
            _, chosen = torch.topk(weights, self.top_k, dim=-1)
            ones = torch.ones(chosen.numel(), dtype=torch.float32, device=chosen.device)
            # whole numbers: exact in fp32 in any order of addition (below 2**24 per expert)
            count = count + torch.zeros_like(count).scatter_add_(0, chosen.reshape(-1), ones)
            prob = prob + weights.float().sum(dim=0)
            rows = rows + weights.shape[0]
        return torch.cat([count.detach(), prob, rows.detach()])

    def loss(self, sums: torch.Tensor) -> torch.Tensor:
        """HF's ``aux_loss`` from the sums over all layers (without the coefficient)."""
        e = self.experts
        count, prob, rows = sums[:e], sums[e : 2 * e], sums[2 * e]
        return torch.sum((count / rows) * (prob / rows).unsqueeze(0)) * e


def load_balance(config: object, router: tuple[type, int] | None) -> LoadBalance | None:
    """The loss for ``config`` when it is on (HF's rule: ``output_router_logits``), else None.
    ``router``: the family's router class and logits index (None: no routers)."""
    if router is None or not getattr(config, "output_router_logits", False):
        return None
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    return LoadBalance(router[0], router[1], experts, config.num_experts_per_tok, float(config.router_aux_loss_coef))


def with_router_loss(config: object, coef: float | None) -> object:
    """``config`` with ``--moe-aux-loss-coef``: ``None`` leaves the config's choice (HF's
    behaviour for that checkpoint), 0 turns the loss off, a positive value on with that weight."""
    if coef is None:
        return config
    if coef < 0:
        raise ValueError(f"--moe-aux-loss-coef {coef} is negative; use 0 to turn the router loss off")
    config.output_router_logits = coef > 0
    config.router_aux_loss_coef = coef
    return config
