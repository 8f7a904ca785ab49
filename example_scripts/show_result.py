"""Print how the loss moved during a run and a short greedy generation from the trained model.

python example_scripts/show_result.py --model <HF folder> --metrics <checkpoint-path>/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

log = logging.getLogger("show_result")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model folder (convert/to_hf.py output)")
    parser.add_argument("--metrics", required=True, help="metrics.jsonl of the run")
    parser.add_argument("--prompt", default="Ada went to", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.disable_progress_bar()  # a loading bar for a tiny model is noise in the quickstart's log

    with open(args.metrics) as f:
        rows = [json.loads(line) for line in f]
    log.info("loss: step %d %.3f -> step %d %.3f", rows[0]["step"], rows[0]["loss"], rows[-1]["step"], rows[-1]["loss"])

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    log.info("generation: %s", tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
