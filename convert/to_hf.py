"""Layer-sharded checkpoint -> Hugging Face folder that ``from_pretrained`` loads.

    python convert/to_hf.py --ckpt-path checkpoints/run1 --save-path run1-hf

``--ckpt-path`` may be a layer-sharded model directory, one ``checkpoint_<step>`` directory,
or a ``--checkpoint-path`` directory (its ``latest`` step is used). The layout says how many
layers there are; the training topology does not matter.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from modules import EMBEDDING_PART, HEAD_PART, family_for, layer_part, load_config
from modules.layout import copy_model_files, layer_indices, load_part, resolve_model_dir

log = logging.getLogger("convert.to_hf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sharded_state_dict(model_dir: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """The HF config and the HF-named state dict gathered from every part of ``model_dir``."""
    config = load_config(model_dir)
    family = family_for(config.model_type)
    layers = layer_indices(model_dir)
    if layers != list(range(config.num_hidden_layers)):
        raise FileNotFoundError(
            f"{model_dir} holds layers {layers} but config.json says {config.num_hidden_layers}; "
            "the checkpoint is incomplete (were all stages' files gathered here?)"
        )
    state: dict[str, torch.Tensor] = {}
    for part in (EMBEDDING_PART, *(layer_part(i) for i in layers), HEAD_PART):
        for local, tensor in load_part(model_dir, part).items():
            state[family.shard_to_hf(part, local)] = tensor
    return config, state


def convert_to_hf(ckpt_path: str | Path, save_path: str | Path, dtype: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(ckpt_path)
    save_path = Path(save_path)
    if save_path.exists() and any(save_path.iterdir()):
        raise FileExistsError(f"--save-path {save_path} is not empty; choose a new directory (nothing was written)")
    config, state = sharded_state_dict(model_dir)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output weights appear once in our shards; any other gap is a broken checkpoint.
    tied = getattr(model, "_tied_weights_keys", None) or {}
    missing = [k for k in missing if not (config.tie_word_embeddings and k in tied)]
    if missing or unexpected:
        raise KeyError(f"{model_dir}: weights missing {missing[:4]} / unexpected {unexpected[:4]}")
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    model.save_pretrained(save_path)
    copy_model_files(model_dir, save_path)
    model.config.save_pretrained(save_path)  # after the copy: records the dtype written
    log.info("wrote HF model from %s to %s", model_dir, save_path)
    return save_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-path", required=True, help="sharded model, checkpoint_<step> or checkpoint root")
    parser.add_argument("--save-path", required=True, help="new, empty folder for the HF model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as stored)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per conversion is enough
    try:
        convert_to_hf(args.ckpt_path, args.save_path, args.dtype)
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"to_hf: {err}")


if __name__ == "__main__":
    main()
