"""Hugging Face model -> layer-sharded checkpoint (one safetensors file per part).

python convert/from_hf.py --model-name EleutherAI/pythia-410m --save-dir pretrained/pythia-410m

A local folder of safetensors files (one ``model.safetensors`` or shards with their index) is
streamed: each part's tensors are read from the files' memory maps and written before the next
part is read, so converting needs about one part of memory, not one model. Anything else (a hub
id, ``pytorch_model.bin``) goes through ``from_pretrained`` and holds the whole model.

An HF reward model (``...ForSequenceClassification`` with one label) becomes a reward checkpoint
that ``--objective reward`` trains on and ``convert/to_hf.py`` writes back: its ``score.weight``
is the score head (``score.safetensors``). A classifier has no output layer; the head part
holds one all the same (the layout has it), tied to the embedding where the config ties them,
else zeros; a reward model never uses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from modules import EMBEDDING_PART, HEAD_PART, SCORE_PART, Family, is_classifier, layer_part, read_config
from modules.layout import save_part

log = logging.getLogger("convert.from_hf")


# Buffers older files saved beside the weights (masks, rotary tables); the blocks rebuild them.
_STALE_BUFFERS = ("attn.bias", "attn.masked_bias", "attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


def safetensors_files(folder: Path) -> list[Path] | None:
    """The safetensors files of an HF folder (from its index when sharded), or None."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def expected_keys(family: Family, config: object) -> dict[str, set[str]]:
    """The keys each part holds (built on the meta device: nothing is allocated); layers may
    differ (a Qwen3-MoE layer listed in ``mlp_only_layers`` has a dense MLP)."""
    with torch.device("meta"):
        pieces = {
            EMBEDDING_PART: family.embedding(config),
            **{layer_part(i): family.block(config, i) for i in range(config.num_hidden_layers)},
            HEAD_PART: family.head(config),
        }
    return {name: set(module.state_dict()) for name, module in pieces.items()}


SCORE_KEY = "score.weight"  # HF's ForSequenceClassification head


def check_classifier(config: object) -> None:
    labels = getattr(config, "num_labels", 1)
    if labels != 1:
        raise ValueError(
            f"this sequence classifier has {labels} labels; a reward model scores with one (num_labels 1): "
            "convert a reward model, or a causal LM to train one from"
        )


def stream_parts(folder: Path, files: list[Path], family: Family, config: object) -> Iterator[tuple[str, dict]]:
    """Each part's tensors in turn, read tensor by tensor from ``files``; checked against the
    keys the part must hold (a tied output weight absent from the files is the embedding's; a
    classifier's absent one is zeros, its score head a part of its own)."""
    from safetensors import safe_open

    classifier = is_classifier(config)
    where: dict[str, dict[str, tuple[Path, str]]] = defaultdict(dict)  # part -> local key -> (file, key)
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if classifier and key == SCORE_KEY:
                    where[SCORE_PART]["weight"] = (file, key)
                    continue
                try:
                    part, local = family.hf_to_shard(key, on_disk=True)
                except KeyError:
                    if key.endswith(_STALE_BUFFERS):
                        continue
                    raise
                where[part][local] = (file, key)
    expected = expected_keys(family, config)
    tied = getattr(config, "tie_word_embeddings", False)
    embedding_key, head_key = family.tied_keys
    if tied and head_key not in where[HEAD_PART] and embedding_key in where[EMBEDDING_PART]:
        where[HEAD_PART][head_key] = where[EMBEDDING_PART][embedding_key]
    score = where.pop(SCORE_PART, None)
    if classifier and score is None:
        raise KeyError(f"{folder}: a sequence classifier without {SCORE_KEY!r}; is the folder complete?")
    # every part is checked before the first is read, so a bad folder leaves nothing written
    plan = {}
    zeros: set[str] = set()  # a classifier's output layer, which its files do not have
    for part in [EMBEDDING_PART, *(layer_part(i) for i in range(config.num_hidden_layers)), HEAD_PART]:
        wanted = expected[part]
        found = {k: v for k, v in where.pop(part, {}).items() if k in wanted or not k.endswith(_STALE_BUFFERS)}
        held = family.memory_keys(part, set(found))  # experts: per-expert files, fused in memory
        if classifier and part == HEAD_PART:
            zeros = wanted - held
            held |= zeros
        if held != wanted:
            missing, unexpected = sorted(wanted - held), sorted(held - wanted)
            raise KeyError(
                f"{folder}: part {part} has missing weights {missing[:4]} and unexpected ones {unexpected[:4]}; "
                "is the folder complete?"
            )
        plan[part] = found
    if where:
        raise KeyError(f"{folder}: weights for parts the config does not have: {sorted(where)[:4]}")
    if score is not None:
        plan[SCORE_PART] = score
    for part, found in plan.items():
        tensors = {}
        for file in sorted({file for file, _ in found.values()}):
            with safe_open(str(file), "pt") as f:
                tensors |= {local: f.get_tensor(key) for local, (path, key) in found.items() if path == file}
        if part == SCORE_PART:
            yield part, tensors
            continue
        if part == HEAD_PART and zeros:
            tensors |= _absent_output(family, config, zeros, plan[EMBEDDING_PART])
        yield part, family.to_memory(part, tensors)


def _absent_output(family: Family, config: object, keys: set[str], embedding: dict) -> dict:
    """A classifier's output layer, which HF's classifier lacks: zeros of the shape and dtype
    the head expects (the embedding's dtype); never used by a reward model."""
    from safetensors import safe_open

    file, key = embedding[family.tied_keys[0]]
    with safe_open(str(file), "pt") as f:
        dtype = f.get_slice(key).get_dtype()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in family.head(config).state_dict().items() if k in keys}
    dtype = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32"))
    return {k: torch.zeros(shape, dtype=dtype) for k, shape in shapes.items()}


def _whole_model_parts(model_name: str, family: Family, config: object) -> Iterator[tuple[str, dict]]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    log.info("%s has no safetensors files here: loading the whole model to convert it", model_name)
    # from_pretrained maps old and new on-disk key names to the in-memory ones we key on.
    classifier = is_classifier(config)
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = auto.from_pretrained(model_name, dtype="auto")
    parts: dict[str, dict] = defaultdict(dict)
    for hf_key, tensor in model.state_dict().items():
        if classifier and hf_key == SCORE_KEY:
            parts[SCORE_PART]["weight"] = tensor
            continue
        part, local = family.hf_to_shard(hf_key)
        parts[part][local] = tensor
    if classifier:
        with torch.device("meta"):
            head = family.head(config).state_dict()
        embedding = parts[EMBEDDING_PART][family.tied_keys[0]]
        tied = getattr(config, "tie_word_embeddings", False)
        for key in head.keys() - parts[HEAD_PART].keys():
            parts[HEAD_PART][key] = embedding if tied else torch.zeros(head[key].shape, dtype=embedding.dtype)
    yield from parts.items()


def convert_from_hf(model_name: str, save_dir: str | Path, model_type: str | None = None) -> Path:
    """Write ``model_name`` (a local HF folder or a hub id) as shards into ``save_dir``."""
    from transformers import AutoTokenizer

    save_dir = Path(save_dir)
    if save_dir.exists() and any(save_dir.iterdir()):
        raise FileExistsError(f"--save-dir {save_dir} is not empty; choose a new directory (nothing was written)")
    config, family = read_config(model_name, model_type)
    if is_classifier(config):
        check_classifier(config)
    files = safetensors_files(Path(model_name)) if Path(model_name).is_dir() else None
    if files is not None:
        parts = stream_parts(Path(model_name), files, family, config)
    else:
        parts = _whole_model_parts(model_name, family, config)
    # Written into a hidden sibling and renamed when complete: a failure leaves nothing behind.
    partial = save_dir.with_name(f".{save_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        count = 0
        for part, tensors in parts:
            save_part(partial, part, tensors)
            count += 1
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        if is_classifier(config):
            _pool_as_hf(config, tokenizer)
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if save_dir.exists():
            save_dir.rmdir()  # empty, checked above
        partial.rename(save_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("wrote %d shards of %s (%s) to %s", count, model_name, family.name, save_dir)
    return save_dir


def _pool_as_hf(config: object, tokenizer: object) -> None:
    """HF's classifier scores a sequence at its last token that is not ``config.pad_token_id``;
    the trainer pads with the tokenizer's pad token (else EOS) and scores before it. The copy of
    the tokenizer saved with the shards gets the config's pad token, so both pool at one place."""
    ours = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = ours
    elif config.pad_token_id != ours:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
        log.info("the classifier pools before pad token %d (%r): the tokenizer saved here pads with it",
                 config.pad_token_id, tokenizer.pad_token)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", required=True, help="HF model folder or hub id to convert")
    parser.add_argument("--save-dir", required=True, help="new, empty folder for the layer-sharded checkpoint")
    parser.add_argument(
        "--model-type", default=None, help="family, checked against config.json (default: read from config.json)"
    )
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
