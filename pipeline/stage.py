"""A stage: this rank's consecutive global layers, plus the embedding (first) and head (last)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modules import EMBEDDING_PART, HEAD_PART, Family, init_weights, layer_part, part_generator
from modules.layout import load_part, part_exists
from modules.lora import LoraSpec, adapter_part, adapter_state, add_adapters, is_adapter_parameter, load_adapter_state
from modules.routing import load_balance


def saved_part_names(
    layers: Iterable[int], is_first: bool, is_last: bool, lora: bool, extra: Iterable[str] = ()
) -> list[str]:
    """The shard names a checkpoint holds of a stage of ``layers``, in order: every part, or
    under LoRA each block's adapters; the last stage adds the ``extra`` parts its objective
    gave it (a reward model's score head), whole under LoRA too (``Stage.saved_parts``; known
    before the stage is built)."""
    added = list(extra) if is_last else []
    if lora:
        return [adapter_part(layer_part(i)) for i in layers] + added
    return [EMBEDDING_PART] * is_first + [layer_part(i) for i in layers] + [HEAD_PART] * is_last + added


class Stage(nn.Module):
    """A plain module; ``forward`` maps token ids or hidden states to hidden states or logits."""

    def __init__(
        self,
        family: Family,
        config: object,
        layers: range,
        is_first: bool,
        is_last: bool,
        recompute: bool = False,
        device: torch.device | str = "cpu",
        extra: Mapping[str, Callable[[object], nn.Module]] | None = None,
        output_used: bool = True,
    ) -> None:
        """The parts are built on the meta device and then given uninitialised memory on
        ``device``: no layer of another stage is ever allocated, and no random initialisation
        runs that ``load_parts`` or ``init_parts`` (one of which must follow) would overwrite.
        ``extra``: parts the objective adds to the last stage, by shard name, each built from
        the config (a reward model's score head), an attribute of that name; ``output_used``
        False: the output layer is not used (it stays as loaded, frozen; a tied one is untied)."""
        super().__init__()
        self.layer_ids = list(layers)
        # Activation recomputation: a block keeps only its input for the backward and runs its
        # forward again there, so a held micro-batch costs one hidden state per block.
        self.recompute = recompute
        # False: the last stage returns the final norm's output and the loss applies the output
        # layer chunk by chunk (objectives.loss.chunked_token_loss), never holding all the logits.
        self.project_logits = True
        with torch.device("meta"):
            self.embedding = family.embedding(config) if is_first else None
            self.layers = nn.ModuleDict({str(i): family.block(config, i) for i in self.layer_ids})
            self.head = family.head(config) if is_last else None
            self.extra_names = tuple(extra or {}) if is_last else ()
            for name in self.extra_names:
                self.add_module(name, extra[name](config))
        for part in self.parts().values():
            part.to_empty(device=device)
        if self.head is not None and not output_used:  # it stays as loaded, untrained
            self.head.output.requires_grad_(False)
        # The context's tables (rotary frequencies) are computed, not loaded: built for real.
        self.context = family.context(config).to(device)
        # an unused output layer is not kept tied (HF's ForSequenceClassification has none)
        tied = getattr(config, "tie_word_embeddings", False) and output_used
        self.tied_keys = family.tied_keys if tied else None
        self.family = family
        self.config = config
        # a mixture of experts' load-balancing loss, when the config asks for it (``routed``)
        self.balance = load_balance(config, family.router() if family.router is not None else None)
        self.lora: LoraSpec | None = None  # set by add_lora: base frozen, adapters trained
        if self.tied_keys and self.embedding is not None and self.head is not None:
            # One stage holds both ends: one tensor, as in the HF model (tied after to_empty,
            # which gives each module's parameters new tensors).
            owner, _, name = self.tied_keys[1].rpartition(".")
            setattr(self.head.get_submodule(owner), name, self.embedding.get_parameter(self.tied_keys[0]))

    def tied_copy(self) -> nn.Parameter | None:
        """This stage's copy of the tied input/output weight, when the two ends sit on different
        stages (their gradients must then be summed every step so the copies never drift)."""
        if self.tied_keys is None or (self.embedding is None) == (self.head is None):
            return None
        if self.embedding is not None:
            weight = self.embedding.get_parameter(self.tied_keys[0])
        else:
            weight = self.head.get_parameter(self.tied_keys[1])
        return weight if weight.requires_grad else None  # frozen under LoRA: nothing to sum

    def parts(self) -> dict[str, nn.Module]:
        """The pieces of this stage by shard name: how they are stored, whatever the topology."""
        first, last = self.embedding is not None, self.head is not None
        names = saved_part_names(self.layer_ids, first, last, lora=False, extra=self.extra_names)
        modules = [self.embedding, *(self.layers[str(i)] for i in self.layer_ids), self.head, *self.extra_parts()]
        return dict(zip(names, [m for m in modules if m is not None], strict=True))

    def extra_parts(self) -> list[nn.Module]:
        """The parts the objective added to this (last) stage, in order."""
        return [self.get_submodule(name) for name in self.extra_names]

    def init_parts(self, std: float, seed: int) -> None:
        """Random weights for training from scratch, independent of how layers are split."""
        for part, module in self.parts().items():
            init_weights(module, std, seed, part, self.family.norm_init)
        if self.tied_keys and self.head is not None:
            # a tied output weight (this stage's copy, or the one tensor it shares with the
            # embedding) starts as the embedding does: the first tensor of the embedding's stream
            # (and its padding row zeroed, as init_weights leaves the embedding's)
            weight = self.head.get_parameter(self.tied_keys[1])
            with torch.device("meta"):
                padding_idx = self.family.embedding(self.config).token_embedding.padding_idx
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=part_generator(seed, EMBEDDING_PART)) * std)
                if padding_idx is not None:
                    weight[padding_idx].zero_()

    def load_parts(self, model_dir: str, prefix: str = "", std: float = 0.02, seed: int = 0) -> None:
        """Load every part of this stage from a layer-sharded directory (strict: no silent gaps);
        ``prefix`` names another copy of the parts there (a checkpoint's other replicas). A part
        the objective added that the folder lacks (a reward model's score head, from a causal
        LM's folder) starts as HF starts a new head, normal with ``std``, drawn from ``seed``."""
        for part, module in self.parts().items():
            if part in self.extra_names and not part_exists(model_dir, prefix + part):
                init_weights(module, std, seed, part)
                continue
            tensors = load_part(model_dir, prefix + part)
            missing, unexpected = module.load_state_dict(tensors, strict=False)
            if missing or unexpected:
                raise KeyError(
                    f"shard {part} in {model_dir} does not fit the model: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}; was it converted for another --model-type?"
                )

    def add_lora(self, spec: LoraSpec, seed: int, frozen_dtype: torch.dtype | None = None) -> LoraSpec:
        """Adapters on every block of this stage (after the base weights are loaded); every
        base weight is frozen. Returns the spec with its targets resolved.

        ``frozen_dtype`` (the fp16/bf16 autocast dtype) stores the blocks' frozen linear layers
        in that dtype: autocast rounds them to it at every use anyway, so results are the same
        bit for bit while their memory halves. Norms, embedding and head keep their dtype."""
        first_block = self.layers[str(self.layer_ids[0])]
        spec = spec.resolved(first_block, self.family)
        for i in self.layer_ids:
            add_adapters(self.layers[str(i)], spec, seed, layer_part(i))
        for name, param in self.named_parameters():
            # the parts the objective added are new: trained whole, as PEFT's modules_to_save
            whole = name.partition(".")[0] in self.extra_names
            param.requires_grad_(is_adapter_parameter(name) or whole)
        if frozen_dtype is not None:
            for name, module in self.layers.named_modules():
                linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
                if linear and ".lora_" not in name:
                    module.to(frozen_dtype)
        self.lora = spec
        return spec

    def saved_parts(self) -> dict[str, nn.Module]:
        """What a checkpoint of this stage holds, by shard name: every part, or under LoRA the
        adapters of each block only (``lora_layer_<i>``); the base stays where it was loaded from."""
        if self.lora is None:
            return self.parts()
        names = saved_part_names(self.layer_ids, False, self.head is not None, lora=True, extra=self.extra_names)
        modules = [*(self.layers[str(i)] for i in self.layer_ids), *self.extra_parts()]
        return dict(zip(names, modules, strict=True))

    def saved_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        whole = self.lora is None or any(module is part for part in self.extra_parts())
        return module.state_dict() if whole else adapter_state(module)

    def load_saved(self, directory: str, prefix: str = "") -> None:
        """Load what ``saved_parts`` names from a checkpoint directory (files ``prefix + part``)."""
        if self.lora is None:
            self.load_parts(directory, prefix)
            return
        for part, module in self.saved_parts().items():
            tensors = load_part(directory, prefix + part)
            if part in self.extra_names:
                module.load_state_dict(tensors, strict=True)
            else:
                load_adapter_state(module, tensors, f"{directory}/{prefix}{part}")

    def routed(
        self, x: torch.Tensor, sums: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``, and the router sums ``sums`` with this stage's routers added
        (modules.routing; a stage without routers passes them on)."""
        if self.balance is None:
            raise ValueError("this model's config does not ask for the router load-balancing loss")
        with self.balance.recording(self.layers) as logits:
            out = self(x, position_ids)
        return out, self.balance.add(sums, logits)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` (micro, seq): where packed examples restart their positions (None: 0..seq-1)."""
        return self._run(x, position_ids)

    def decode(self, x: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor, cache: object) -> torch.Tensor:
        """One generation pass (generation/): a prompt's tokens or the newest one, attending to what
        ``cache`` (HF's cache of this stage's layers) holds and adding theirs to it; ``padding``
        (micro, cached + new) 0 on left padding. The last stage returns the final norm's output:
        its caller projects the positions it samples from (``Head.project``)."""
        return self._run(x, position_ids, padding, cache)

    def _run(
        self, x: torch.Tensor, position_ids: torch.Tensor | None, padding: torch.Tensor | None = None,
        cache: object | None = None,
    ) -> torch.Tensor:  # fmt: skip
        hidden = self.embedding(x, position_ids) if self.embedding is not None else x  # (micro, seq, hidden)
        # masks and rotary tables, once per micro-batch
        inputs = self.context(hidden, position_ids, padding, cache, self.layer_ids)
        if cache is not None:
            for index, layer in zip(self.layer_ids, self.layers.values(), strict=True):
                hidden = layer(hidden, **inputs(index), **{self.family.cache_arg: cache})
            return self.head.normed(hidden) if self.head is not None else hidden
        for index, layer in zip(self.layer_ids, self.layers.values(), strict=True):
            if self.recompute and torch.is_grad_enabled():
                # Non-reentrant: kwargs pass through and only what the backward needs is kept.
                # The RNG state is saved and restored, so dropout draws the same masks again.
                hidden = checkpoint(layer, hidden, use_reentrant=False, preserve_rng_state=True, **inputs(index))
            else:
                hidden = layer(hidden, **inputs(index))
        if self.head is None:
            return hidden
        return self.head(hidden) if self.project_logits else self.head.normed(hidden)
