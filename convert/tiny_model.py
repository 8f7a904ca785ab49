"""Build a tiny, randomly initialised HF model and a byte-level BPE tokenizer, offline.

Used by the quickstart and the tests: no hub, a fraction of a second.

    python convert/tiny_model.py --save-dir tiny-neox --corpus example_scripts/data/tiny.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

EOS = "<|endoftext|>"
log = logging.getLogger("convert.tiny_model")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> object:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def tiny_config(model_type: str, vocab_size: int, num_layers: int, hidden: int = 32, heads: int = 4) -> object:
    """A config of ``model_type`` small enough to train in seconds on one CPU core.

    Each family's tiny model keeps the features that make it differ: partial rotary (GPT-NeoX,
    GPT-J), grouped-query attention, scaled RoPE and tied embeddings (LLaMA), learned positions
    and tied embeddings (GPT-2).
    """
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0}
    if model_type in ("gptneox", "gpt_neox"):
        return GPTNeoXConfig(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=512,
            **common,
        )
    if model_type == "gptj":
        return GPTJConfig(n_embd=hidden, n_layer=num_layers, n_head=heads, rotary_dim=4, n_positions=512, **common)
    if model_type == "llama":
        return LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            intermediate_size=2 * hidden,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            **common,
        )
    if model_type == "gpt2":
        # No dropout: runs are compared step by step with a single-process reference.
        no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=heads, n_positions=512, **no_dropout, **common)
    raise ValueError(f"no tiny config for model type {model_type!r}; choose gptneox, gptj, llama or gpt2")


def read_texts(corpus: str | Path) -> list[str]:
    with open(corpus) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build_tiny_model(
    save_dir: str | Path, texts: list[str], model_type: str = "gptneox", num_layers: int = 4, seed: int = 0
) -> Path:
    """Write a tiny HF model (random weights from ``seed``) and its tokenizer to ``save_dir``."""
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(texts)
    config = tiny_config(model_type, len(tokenizer), num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-dir", required=True, help="folder for the HF model and tokenizer")
    parser.add_argument("--corpus", required=True, help="jsonl with a 'text' field to train the tokenizer on")
    parser.add_argument(
        "--model-type", default="gptneox", choices=("gptneox", "gptj", "llama", "gpt2"), help="family of the model"
    )
    parser.add_argument("--num-layers", type=int, default=4, help="transformer layers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_tiny_model(args.save_dir, read_texts(args.corpus), args.model_type, args.num_layers, args.seed)
    log.info("wrote tiny %s to %s", args.model_type, args.save_dir)


if __name__ == "__main__":
    main()
