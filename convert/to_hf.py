"""Layer-sharded checkpoint -> Hugging Face folder that ``from_pretrained`` loads.

    python convert/to_hf.py --ckpt-path checkpoints/run1 --save-path run1-hf

``--ckpt-path`` may be a layer-sharded model directory, one ``checkpoint_<step>`` directory,
or a ``--checkpoint-path`` directory (its ``latest`` step is used). The layout says how many
layers there are; the training topology does not matter.

Full weights are written part by part into HF's sharded safetensors layout
(``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``; one
``model.safetensors`` when it fits in ``--max-shard-gb``), holding one part in memory at a time.

A reward model (trained with ``--objective reward``) is written as HF's ForSequenceClassification
model of its family (``score.weight``, one label, ``pad_token_id`` set): a folder
``AutoModelForSequenceClassification`` loads.

A LoRA checkpoint holds adapters only; its ``lora.json`` names the base model directory
(``--base-model`` overrides it). ``--lora-export merged`` writes the base with the adapters
folded in, streamed as above (PEFT merges each block on its own); ``--lora-export adapter``
writes a folder ``PeftModel.from_pretrained`` loads onto HF's base model (it builds the base
model in memory to do so).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from convert.safetensors_stream import Entry, ShardWriter, part_layout
from modules import EMBEDDING_PART, HEAD_PART, SCORE_PART, family_for, layer_part, load_config
from modules.layout import copy_model_files, layer_indices, load_part, part_exists, resolve_model_dir
from modules.lora import LoraSpec, adapter_part, add_adapters, hf_block_path, is_adapter_parameter, load_adapter_state

log = logging.getLogger("convert.to_hf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES |= {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the trainer's spelling
DEFAULT_SHARD_GB = 5.0  # as save_pretrained's default max_shard_size


def model_parts(model_dir: str | Path) -> tuple[object, list[str]]:
    """The HF config and every part of ``model_dir`` in order, checked complete."""
    config = load_config(model_dir)
    layers = layer_indices(model_dir)
    if layers != list(range(config.num_hidden_layers)):
        raise FileNotFoundError(
            f"{model_dir} holds layers {layers} but config.json says {config.num_hidden_layers}; "
            "the checkpoint is incomplete (were all stages' files gathered here?)"
        )
    return config, [EMBEDDING_PART, *(layer_part(i) for i in layers), HEAD_PART]


def sharded_state_dict(model_dir: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """The HF config and the HF-named state dict gathered from every part of ``model_dir``."""
    config, parts = model_parts(model_dir)
    family = family_for(config.model_type)
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        for local, tensor in load_part(model_dir, part).items():
            state[family.shard_to_hf(part, local)] = tensor
    return config, state


PartTransform = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def write_hf_shards(
    model_dir: Path, save_path: Path, dtype: torch.dtype | None, max_shard_bytes: int,
    transform: PartTransform | None = None, score_dir: Path | None = None,
) -> tuple[object, int, torch.dtype]:  # fmt: skip
    """Write the parts of ``model_dir`` as HF safetensors shards, holding one part at a time
    (the shards' headers come from the parts' headers). Returns the config, the bytes written
    and the dtype of the weights. A tied output weight is written once, as the embedding (as
    HF writes it); names are those of HF's own files. ``transform(part, tensors)`` may change
    each part's values as it is read (same names, shapes and dtypes). ``score_dir`` holds a
    reward model's score head: it is written as ``score.weight`` in place of the output layer,
    as HF's ForSequenceClassification models hold it."""
    config, parts = model_parts(model_dir)
    family = family_for(config.model_type)
    skip = (HEAD_PART, family.tied_keys[1]) if getattr(config, "tie_word_embeddings", False) else None
    with torch.device("meta"):
        output = family.head(config).out_name + "."  # the output layer's keys in the head part
    plan: dict[str, list[tuple[str, Entry]]] = {}  # part -> (key as HF's files cut it, what is written)
    for part in parts:
        plan[part] = [
            (local, Entry(family.shard_to_hf(part, local, on_disk=True), shape, dtype or stored))
            for local, (shape, stored) in family.disk_shapes(part, part_layout(model_dir, part)).items()
            if (part, local) != skip and not (score_dir is not None and part == HEAD_PART and local.startswith(output))
        ]
    if score_dir is not None:
        ((shape, stored),) = part_layout(score_dir, SCORE_PART).values()
        plan[SCORE_PART] = [("weight", Entry("score.weight", shape, dtype or stored))]
    entries = [entry for part_entries in plan.values() for _, entry in part_entries]
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    shard_of = {entry.name: k for k, entries in enumerate(shards) for entry in entries}

    save_path.mkdir(parents=True, exist_ok=True)
    writer, open_shard = None, -1
    for part, part_entries in plan.items():
        tensors = load_part(score_dir if part == SCORE_PART else model_dir, part)
        if transform is not None:
            tensors = transform(part, tensors)
        tensors = family.to_disk(part, tensors)  # experts: one tensor each, as HF's files hold them
        for local, entry in part_entries:
            if shard_of[entry.name] != open_shard:  # shards follow the plan's order: one open at a time
                if writer is not None:
                    writer.close()
                open_shard = shard_of[entry.name]
                writer = ShardWriter(save_path / files[open_shard], shards[open_shard], {"format": "pt"})
            writer.write(entry.name, tensors[local].to(entry.dtype))
        del tensors
    writer.close()
    total = sum(entry.nbytes for entry in entries)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {e.name: files[shard_of[e.name]] for e in entries}}
        (save_path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    floating = [e.dtype for e in entries if e.dtype.is_floating_point]
    return config, total, floating[0] if floating else torch.float32


def _hf_model(config: object, state: dict[str, torch.Tensor], model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output weights appear once in our shards; any other gap is a broken checkpoint.
    tied = getattr(model, "_tied_weights_keys", None) or {}
    missing = [k for k in missing if not (config.tie_word_embeddings and k in tied)]
    if missing or unexpected:
        raise KeyError(f"{model_dir}: weights missing {missing[:4]} / unexpected {unexpected[:4]}")
    return model


def merge_adapters(base_dir: Path, adapter_dir: Path, spec: LoraSpec) -> PartTransform:
    """For ``write_hf_shards`` over the base: each layer's weights with its adapters merged in
    by PEFT itself, one block at a time (never the whole model)."""
    from peft.tuners.lora import LoraLayer

    config = load_config(base_dir)
    family = family_for(config.model_type)
    layers = {layer_part(i): i for i in range(config.num_hidden_layers)}
    adapters = [adapter_part(part) for part in layers]
    missing = [name for name in adapters if not (adapter_dir / f"{name}.safetensors").is_file()]
    if missing:  # checked before the first file is written
        raise FileNotFoundError(
            f"{adapter_dir} lacks the adapters {missing[:3]} of its base's layers: the checkpoint is incomplete "
            "(were all stages' files gathered here?)"
        )

    def merged(part: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if part not in layers:
            return tensors  # embedding and head: LoRA adapts blocks only
        with torch.device("meta"):
            block = family.block(config, layers[part])
        block.to_empty(device="cpu")
        block.load_state_dict(tensors, strict=True)
        add_adapters(block, spec, seed=0, part=part)  # their values are loaded next
        load_adapter_state(block, load_part(adapter_dir, adapter_part(part)), str(adapter_dir / adapter_part(part)))
        for module in block.modules():
            if isinstance(module, LoraLayer):
                module.merge()
        # PEFT renamed each adapted weight to <layer>.base_layer.weight: back to the base's names
        out = {
            name.replace(".base_layer.", "."): value.detach()
            for name, value in block.state_dict().items()
            if not is_adapter_parameter(name)
        }
        if out.keys() != tensors.keys():
            odd = sorted(out.keys() ^ tensors.keys())[:3]
            raise KeyError(f"{part}: the merged block's weights are not the base's ({odd}); is --base-model right?")
        return {name: value.to(tensors[name].dtype) for name, value in out.items()}

    return merged


def _with_adapters(model_dir: Path, spec: LoraSpec, base_dir: Path, base_hf_name: str | None) -> torch.nn.Module:
    """HF's model of the base, wrapped by PEFT and holding the checkpoint's adapters."""
    from peft import get_peft_model

    config, state = sharded_state_dict(base_dir)
    family = family_for(config.model_type)
    model = _hf_model(config, state, base_dir)
    peft_model = get_peft_model(model, spec.peft_config(model))
    adapters = {}
    for i in range(config.num_hidden_layers):
        for local, tensor in load_part(model_dir, adapter_part(layer_part(i))).items():
            adapters[f"base_model.model.{hf_block_path(family, i)}.{local}"] = tensor
    load_adapter_state(peft_model, adapters, str(model_dir))
    # what AutoPeftModelForCausalLM loads the base from: an HF name or folder, never our shards
    peft_model.peft_config["default"].base_model_name_or_path = base_hf_name
    return peft_model


def convert_to_hf(
    ckpt_path: str | Path,
    save_path: str | Path,
    dtype: str | None = None,
    lora_export: str | None = None,
    base_model: str | Path | None = None,
    base_hf_name: str | None = None,
    max_shard_gb: float = DEFAULT_SHARD_GB,
) -> Path:
    """Write a plain HF model; from a LoRA checkpoint, its base with the adapters merged in
    (``lora_export="merged"``, the default) or a PEFT adapter folder (``"adapter"``)."""
    model_dir = resolve_model_dir(ckpt_path)
    save_path = Path(save_path)
    if save_path.exists() and any(save_path.iterdir()):
        raise FileExistsError(f"--save-path {save_path} is not empty; choose a new directory (nothing was written)")
    lora = LoraSpec.read(model_dir)
    cast = DTYPES[dtype] if dtype not in (None, "auto") else None
    merge, source = None, model_dir
    score_dir = model_dir if part_exists(model_dir, SCORE_PART) else None  # a reward model
    if lora is None:
        if lora_export is not None or base_model is not None or base_hf_name is not None:
            raise ValueError(
                f"{model_dir} holds full weights, not LoRA adapters: drop --lora-export/--base-model/--base-hf-name"
            )
    else:
        spec, recorded_base = lora
        base = Path(base_model or recorded_base)
        if not (base / "config.json").is_file():
            raise FileNotFoundError(
                f"the base model of these adapters, {base}, is not a layer-sharded model directory; "
                "pass --base-model with the --model-name they were trained on"
            )
        if (lora_export or "merged") == "adapter":
            if score_dir is not None:
                raise ValueError(
                    f"{model_dir} is a reward model: export it merged (drop --lora-export adapter), which "
                    "AutoModelForSequenceClassification loads"
                )
            model = _with_adapters(model_dir, spec, base, base_hf_name)
            if cast is not None:
                model = model.to(cast)
            model.save_pretrained(save_path)  # adapter_config.json + adapter_model.safetensors
            copy_model_files(model_dir, save_path, config=False)
            log.info("wrote PEFT adapter from %s (base %s) to %s", model_dir, base, save_path)
            return save_path
        # merged: the base's parts, each layer with its adapters folded in, a plain HF model
        merge, source = merge_adapters(base, model_dir, spec), base
    config, total, config.dtype = write_hf_shards(source, save_path, cast, int(max_shard_gb * 1e9), merge, score_dir)
    copy_model_files(model_dir, save_path)
    if score_dir is not None:
        as_sequence_classifier(config, model_dir)
    config.save_pretrained(save_path)  # after the copy: records the dtype written
    log.info("wrote HF model (%.3g GB) from %s to %s", total / 1e9, model_dir, save_path)
    return save_path


def as_sequence_classifier(config: object, model_dir: Path) -> None:
    """A reward model's config: HF's ForSequenceClassification class of the family, one label,
    and the pad token it pools before (the trainer's padding: the tokenizer's pad, else EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config.architectures = [name.replace("ForCausalLM", "ForSequenceClassification") for name in config.architectures]
    config.num_labels = 1
    config.pad_token_id = pad


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-path", required=True, help="sharded model, checkpoint_<step> or checkpoint root")
    parser.add_argument("--save-path", required=True, help="new, empty folder for the HF model")
    parser.add_argument(
        "--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="cast weights (auto: as stored)"
    )
    parser.add_argument(
        "--max-shard-gb", type=float, default=DEFAULT_SHARD_GB, help="largest safetensors shard written, in GB"
    )
    parser.add_argument(
        "--lora-export",
        choices=("merged", "adapter"),
        default=None,
        help="LoRA checkpoints: merged = base with adapters folded in, a plain HF model (default); "
        "adapter = a PEFT adapter folder for PeftModel.from_pretrained",
    )
    parser.add_argument(
        "--base-model", default=None, help="LoRA checkpoints: the layer-sharded base (default: as recorded)"
    )
    parser.add_argument(
        "--base-hf-name",
        default=None,
        help="--lora-export adapter: the HF name or folder of the base, recorded as base_model_name_or_path "
        "so AutoPeftModelForCausalLM.from_pretrained(<adapter folder>) finds it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per conversion is enough
    try:
        convert_to_hf(args.ckpt_path, args.save_path, args.dtype, args.lora_export, args.base_model,
                      args.base_hf_name, args.max_shard_gb)  # fmt: skip
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"to_hf: {err}")


if __name__ == "__main__":
    main()
