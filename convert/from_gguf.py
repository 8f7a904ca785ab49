"""A GGUF file (llama.cpp's format) -> Hugging Face folder in fp32, which ``from_hf.py`` converts on.

    python convert/from_gguf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --save-dir smollm2-hf

transformers (with the ``gguf`` package) dequantises the file's tensors to fp32 and reads its
tokenizer and chat template; the model it loads refuses ``save_pretrained``, so its weights are
copied into a fresh model of the same class and config, which is saved. The weights are the
dequantised values: the same model as the GGUF file, not its unquantised original.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

log = logging.getLogger("convert.from_gguf")


def convert_from_gguf(gguf: str | Path, save_dir: str | Path) -> Path:
    """Write ``gguf`` as an fp32 HF folder (weights, config, tokenizer) into a new ``save_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, save_dir = Path(gguf), Path(save_dir)
    if not gguf.is_file():
        raise FileNotFoundError(f"--gguf {gguf}: no such file")
    if save_dir.exists() and any(save_dir.iterdir()):
        raise FileExistsError(f"--save-dir {save_dir} is not empty; choose a new directory (nothing was written)")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # the saved weights are plain fp32
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    log.info("wrote %s (%s, %d layers) to %s", gguf.name, config.model_type, config.num_hidden_layers, save_dir)
    return save_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="the .gguf file")
    parser.add_argument("--save-dir", required=True, help="new, empty folder for the HF model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        convert_from_gguf(args.gguf, args.save_dir)
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"from_gguf: {err}")


if __name__ == "__main__":
    main()
