"""Check a model against Hugging Face's own before renting GPUs: one batch through HF's model and
through our stages of the same weights, chained in one process.

    python -m pipeline.check --model-name pretrained/qwen2.5-0.5b      # shards or an HF folder

Prints the loss, the gradient norm and the largest differences of logits and gradients, and
exits 1 when the loss or the gradient norm differ by more than ``--tolerance`` (relative). The
batch is the tokenizer's rendering of a fixed English text where the folder has a tokenizer, else
random tokens. Both sides run in fp32 with dropout off; memory: two copies of the model with
their gradients.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from modules import family_for, load_config
from modules.layout import layer_indices
from pipeline.chain import StageChain, even_split, exact_norm

log = logging.getLogger("pipeline.check")
TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens and wrote the weather into a leather book: wind from the west, a light rain, "
    "two fishing boats returning late. In forty years the light had never failed. "
)


@dataclass(frozen=True)
class Comparison:
    """One batch through both models."""

    loss: float
    hf_loss: float
    grad_norm: float
    hf_grad_norm: float
    logits_diff: float  # largest |ours - HF| over every logit
    grad_diff: float  # largest |ours - HF| over every gradient value, relative to that tensor's largest

    def relative(self) -> tuple[float, float]:
        loss = abs(self.loss - self.hf_loss) / max(abs(self.hf_loss), 1e-12)
        return loss, abs(self.grad_norm - self.hf_grad_norm) / max(self.hf_grad_norm, 1e-12)

    def describe(self) -> str:
        loss, norm = self.relative()
        return (
            f"loss {self.loss:.6f} vs HF {self.hf_loss:.6f} (rel diff {loss:.2e}); "
            f"grad norm {self.grad_norm:.6f} vs HF {self.hf_grad_norm:.6f} (rel diff {norm:.2e}); "
            f"max |logit diff| {self.logits_diff:.2e}; max gradient diff {self.grad_diff:.2e} of its tensor's largest"
        )


def batch_for(model_dir: Path, vocab_size: int, batch: int, seq_length: int) -> torch.Tensor:
    """(batch, seq) token ids: the fixed text, tokenized and repeated, or random ones."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        log.info("no tokenizer in %s: random tokens", model_dir)
        return torch.randint(0, vocab_size, (batch, seq_length), generator=torch.Generator().manual_seed(0))
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ids = (ids * (batch * seq_length // len(ids) + 1))[: batch * seq_length]
    return torch.tensor(ids).view(batch, seq_length)


def compare(
    model_dir: str | Path, stages: int = 2, batch: int = 2, seq_length: int = 128, ids: torch.Tensor | None = None
) -> Comparison:
    """Loss, gradients and logits of one batch (``ids``, or ``batch_for``'s): HF's model against
    ``stages`` of ours."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    family = family_for(config.model_type)
    splits = even_split(config.num_hidden_layers, stages)
    chain = StageChain(family, config, splits)
    if layer_indices(model_dir):  # layer-sharded: HF's model gets the same weights
        chain.load(str(model_dir))
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        hf.load_state_dict(chain.hf_state(), strict=True)
    else:
        hf = AutoModelForCausalLM.from_pretrained(
            str(model_dir), attn_implementation=config._attn_implementation, dtype=torch.float32
        )
        chain.load_hf_state(hf.state_dict())
    chain.float().eval()
    hf.eval()  # dropout off on both sides; gradients still flow
    if ids is None:
        ids = batch_for(model_dir, config.vocab_size, batch, seq_length)

    hf_out = hf(input_ids=ids, labels=ids)
    hf_out.loss.backward()
    logits, aux = chain.routed(ids)  # (batch, seq, vocab)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    if aux is not None:  # HF adds the routers' load-balancing loss with the config's coefficient
        loss = loss + config.router_aux_loss_coef * aux
    loss.backward()
    chain.sum_tied_grads()
    grad_norm = chain.clip_grads(float("inf"))
    hf_grad_norm = exact_norm([p.grad for p in hf.parameters() if p.grad is not None])  # both in float64

    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    grad_diff = 0.0
    for part, module in chain.parts():
        for local, param in module.named_parameters():
            reference = hf_params[family.shard_to_hf(part, local)].grad
            scale = reference.abs().max().clamp_min(1e-30)
            grad_diff = max(grad_diff, ((param.grad - reference).abs().max() / scale).item())
    return Comparison(
        loss=loss.item(),
        hf_loss=hf_out.loss.item(),
        grad_norm=grad_norm.item(),
        hf_grad_norm=hf_grad_norm.item(),
        logits_diff=(logits - hf_out.logits).abs().max().item(),
        grad_diff=grad_diff,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", required=True, help="layer-sharded folder or HF model folder")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages to split the layers into (default 2)")
    parser.add_argument("--batch", type=int, default=2, help="sequences in the batch (default 2)")
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument(
        "--tolerance", type=float, default=1e-5, help="largest relative loss or gradient-norm difference (default 1e-5)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        result = compare(args.model_name, args.stages, args.batch, args.seq_length)
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"check: {err}")
    loss, norm = result.relative()
    verdict = "matches HF" if max(loss, norm) <= args.tolerance else f"DIFFERS from HF beyond {args.tolerance:g}"
    log.info("%s: %s", verdict, result.describe())
    sys.exit(0 if max(loss, norm) <= args.tolerance else 1)


if __name__ == "__main__":
    main()
