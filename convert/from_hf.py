"""Hugging Face model -> layer-sharded checkpoint (one safetensors file per part).

python convert/from_hf.py --model-name EleutherAI/pythia-410m --save-dir pretrained/pythia-410m
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules import family_for
from modules.layout import save_part

log = logging.getLogger("convert.from_hf")


def convert_from_hf(model_name: str, save_dir: str | Path, model_type: str | None = None) -> Path:
    """Write ``model_name`` (a local HF folder or a hub id) as shards into ``save_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    save_dir = Path(save_dir)
    if save_dir.exists() and any(save_dir.iterdir()):
        raise FileExistsError(f"--save-dir {save_dir} is not empty; choose a new directory (nothing was written)")
    config = AutoConfig.from_pretrained(model_name)
    family = family_for(model_type or config.model_type)
    # from_pretrained maps old and new on-disk key names to the in-memory ones we key on.
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype="auto")
    parts: dict[str, dict] = defaultdict(dict)
    for hf_key, tensor in model.state_dict().items():
        part, local = family.hf_to_shard(hf_key)
        parts[part][local] = tensor
    save_dir.mkdir(parents=True, exist_ok=True)
    for part, tensors in parts.items():
        save_part(save_dir, part, tensors)
    model.config.save_pretrained(save_dir)
    AutoTokenizer.from_pretrained(model_name).save_pretrained(save_dir)
    log.info("wrote %d shards of %s (%s) to %s", len(parts), model_name, family.name, save_dir)
    return save_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", required=True, help="HF model folder or hub id to convert")
    parser.add_argument("--save-dir", required=True, help="new, empty folder for the layer-sharded checkpoint")
    parser.add_argument("--model-type", default=None, help="family (gptneox, ...); default: from config.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per conversion is enough
    try:
        convert_from_hf(args.model_name, args.save_dir, args.model_type)
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"from_hf: {err}")


if __name__ == "__main__":
    main()
