"""Mixture-of-experts weights: one tensor per expert in HF's files, fused in HF's model.

HF's files (and every hub checkpoint) keep each expert's projections apart; HF's model, and so
our shards, hold one 3-D tensor per layer, gate and up projections concatenated:

    <disk>.experts.<e>.<gate>.weight  (inter, hidden)  \\
    <disk>.experts.<e>.<up>.weight    (inter, hidden)   >  mlp.experts.gate_up_proj  (experts, 2 inter, hidden)
    <disk>.experts.<e>.<down>.weight  (hidden, inter)  ->  mlp.experts.down_proj     (experts, hidden, inter)
    <disk>.gate.weight                (experts, hidden) -> mlp.gate.weight           (the router)

(``<disk>`` is ``block_sparse_moe`` for Mixtral, ``mlp`` for Qwen3-MoE.) Converting is not a
rename, so a family with experts carries an ``ExpertLayout`` that maps a layer part's tensors
(and, for planning a write, their shapes) between the two layouts; layers without experts (a
Qwen3-MoE ``mlp_only_layers`` entry) pass through unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_FUSED = "mlp.experts."
Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class ExpertLayout:
    disk: str  # the MoE block's name inside a layer on disk
    gate: str  # the per-expert projections' names on disk
    up: str
    down: str

    def _expert_key(self) -> re.Pattern[str]:
        names = "|".join(map(re.escape, (self.gate, self.up, self.down)))
        return re.compile(rf"{re.escape(self.disk)}\.experts\.(\d+)\.({names})\.weight")

    def _router(self) -> tuple[str, str]:
        return f"{self.disk}.gate.weight", "mlp.gate.weight"

    def memory_keys(self, disk_keys: set[str]) -> set[str]:
        """The in-memory names a layer holding ``disk_keys`` has."""
        pattern, (router_disk, router) = self._expert_key(), self._router()
        keys = {k for k in disk_keys if not pattern.fullmatch(k) and k != router_disk}
        if router_disk in disk_keys:
            keys.add(router)
        if any(pattern.fullmatch(k) for k in disk_keys):
            keys |= {_FUSED + "gate_up_proj", _FUSED + "down_proj"}
        return keys

    def to_memory(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A layer's tensors from HF's file names to the fused ones (checked complete)."""
        pattern, (router_disk, router) = self._expert_key(), self._router()
        experts: dict[str, dict[int, torch.Tensor]] = {self.gate: {}, self.up: {}, self.down: {}}
        out = {}
        for key, tensor in tensors.items():
            match = pattern.fullmatch(key)
            if match:
                experts[match.group(2)][int(match.group(1))] = tensor
            else:
                out[router if key == router_disk else key] = tensor
        counts = {len(found) for found in experts.values()}
        if counts == {0}:
            return out
        count = max(counts)
        if any(sorted(found) != list(range(count)) for found in experts.values()):
            raise KeyError(f"experts incomplete: found {[sorted(f) for f in experts.values()]} of {count} each")
        stacked = {name: torch.stack([found[e] for e in range(count)]) for name, found in experts.items()}
        out[_FUSED + "gate_up_proj"] = torch.cat([stacked[self.gate], stacked[self.up]], dim=1)
        out[_FUSED + "down_proj"] = stacked[self.down]
        return out

    def to_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A layer's fused tensors as HF's files name and cut them."""
        router_disk, router = self._router()
        out = {router_disk if k == router else k: v for k, v in tensors.items() if not k.startswith(_FUSED)}
        if _FUSED + "gate_up_proj" in tensors:
            gate_up, down = tensors[_FUSED + "gate_up_proj"], tensors[_FUSED + "down_proj"]
            gate, up = gate_up.chunk(2, dim=1)
            for e in range(gate_up.shape[0]):
                for name, values in ((self.gate, gate), (self.up, up), (self.down, down)):
                    out[f"{self.disk}.experts.{e}.{name}.weight"] = values[e].contiguous()
        return out

    def disk_shapes(self, shapes: Shapes) -> Shapes:
        """What ``to_disk`` gives for tensors of these shapes, in its order, without any tensor."""
        fake = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()}
        return {k: (tuple(t.shape), t.dtype) for k, t in self.to_disk(fake).items()}


MIXTRAL = ExpertLayout(disk="block_sparse_moe", gate="w1", up="w3", down="w2")
QWEN_MOE = ExpertLayout(disk="mlp", gate="gate_proj", up="up_proj", down="down_proj")
