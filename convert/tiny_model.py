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
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar leaves blank lines in logs; training takes a moment
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


# Windows shorter than the tests' sequences (32 tokens), so sliding layers attend differently.
TINY_WINDOW = 8


def decoder_quirks(family: str, num_layers: int, head_dim: int) -> dict:
    """What each LLaMA-layout family's tiny config switches on besides the shared sizes: the
    quirks that make it differ from LLaMA, and a rope scaling type HF trains with."""
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    return {
        # what the LLaMA tests have always trained: tied, linear scaling, no padding token
        "llama": {"pad_token_id": None, "tie_word_embeddings": True, "rope_parameters": {
            "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        # untied with a padding row the lookup must not train; llama3's rope scaling
        "llama_pad": {"tie_word_embeddings": False, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
        "mistral": {"sliding_window": TINY_WINDOW, "tie_word_embeddings": False},
        # q/k/v biases; sliding windows on the layers from max_window_layers on; yarn
        "qwen2": {"use_sliding_window": True, "sliding_window": TINY_WINDOW, "max_window_layers": num_layers // 2,
                  "tie_word_embeddings": True, "rope_parameters": {
                      "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                      "original_max_position_embeddings": 256}},
        "qwen3": {"head_dim": head_dim, "tie_word_embeddings": True, "rope_parameters": {
            "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
        # longrope: one factor per rotary frequency, the long ones past 16 original positions
        "phi3": {"original_max_position_embeddings": 16, "tie_word_embeddings": False, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
            "long_factor": [1.5 + 0.2 * i for i in range(head_dim // 2)]}},
        "olmo2": {"tie_word_embeddings": False},
        "gemma": {"head_dim": head_dim, "tie_word_embeddings": True},
        # both soft-caps, alternating sliding and full layers
        "gemma2": {"head_dim": head_dim, "sliding_window": TINY_WINDOW, "layer_types": alternating,
                   "final_logit_softcapping": 5.0, "attn_logit_softcapping": 10.0, "query_pre_attn_scalar": head_dim,
                   "tie_word_embeddings": True},
        # 4 experts, 2 a token, fused in memory and one file tensor each on disk
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": TINY_WINDOW,
                    "tie_word_embeddings": False},
        # experts with their own width and renormalised top-2 weights; layer 1 a dense MLP
        "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": head_dim,
                      "norm_topk_prob": True, "mlp_only_layers": [1], "tie_word_embeddings": True},
        # a rotary table per layer kind (another base for local layers), linear scaling on global ones
        "gemma3": {"head_dim": head_dim, "sliding_window": TINY_WINDOW, "layer_types": alternating,
                   "final_logit_softcapping": 5.0, "tie_word_embeddings": True, "rope_parameters": {
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}}},
    }[family]  # fmt: skip


def tiny_config(model_type: str, vocab_size: int, num_layers: int, hidden: int = 32, heads: int = 4) -> object:
    """A config of ``model_type`` small enough to train in seconds on one CPU core.

    Each family's tiny model keeps the features that make it differ: partial rotary (GPT-NeoX,
    GPT-J), grouped-query attention, scaled RoPE and tied embeddings (LLaMA), learned positions
    and tied embeddings (GPT-2). The other LLaMA-layout families (``modules.decoders``; and
    ``llama_pad``, a LLaMA with a padding token) have grouped-query attention, a padding token
    that is EOS (so it is in every packed sequence and its embedding row must not train), and
    their quirks from ``decoder_quirks``.
    """
    from transformers import CONFIG_MAPPING, GPT2Config, GPTJConfig, GPTNeoXConfig

    from modules import family_for

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
    if model_type == "gpt2":
        # No dropout: runs are compared step by step with a single-process reference.
        no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=heads, n_positions=512, **no_dropout, **common)
    family = "llama_pad" if model_type == "llama_pad" else family_for(model_type).name
    shared = {
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
    }
    hf_type = family_for(family.removesuffix("_pad")).hf_model_types[0]
    return CONFIG_MAPPING[hf_type](**shared | decoder_quirks(family, num_layers, hidden // heads) | common)


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
    parser.add_argument("--model-type", default="gptneox", help="family of the model (any supported one, or llama_pad)")
    parser.add_argument("--num-layers", type=int, default=4, help="transformer layers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per model is enough
    build_tiny_model(args.save_dir, read_texts(args.corpus), args.model_type, args.num_layers, args.seed)
    log.info("wrote tiny %s to %s", args.model_type, args.save_dir)


if __name__ == "__main__":
    main()
