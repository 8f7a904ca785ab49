"""Converters that stream: part by part, HF's sharded layout both ways, memory that does not
grow with the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert.from_hf import convert_from_hf
from convert.tiny_model import build_tiny_model
from convert.to_hf import convert_to_hf
from tests.helpers import OFFLINE_ENV, ROOT, bundled_texts, load_hf_state


def file_keys(folder: Path) -> set[str]:
    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys |= set(f.keys())
    return keys


def same_shards(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name


@pytest.mark.parametrize("family", ["gptneox", "llama"])  # llama: tied, written once
def test_to_hf_writes_shards_with_an_index_that_hf_loads(family: str, tmp_path: Path) -> None:
    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), family, num_layers=3, seed=2)
    shards = convert_from_hf(hf, tmp_path / "shards")
    out = convert_to_hf(shards, tmp_path / "out", max_shard_gb=20e-6)  # 20 kB: several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == file_keys(out) == file_keys(hf)  # HF's own names, tied weight once
    assert index["metadata"]["total_size"] == sum(t.nbytes for f in files for t in load_file(out / f).values())
    original, back = load_hf_state(hf), load_hf_state(out)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    # and back again from the sharded folder: the same shards as from HF's single file
    same_shards(convert_from_hf(out, tmp_path / "again"), shards)


def test_to_hf_casts_and_records_the_dtype(tiny_shards: Path, tmp_path: Path) -> None:
    out = convert_to_hf(tiny_shards, tmp_path / "bf16", dtype="bf16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_from_hf_reads_legacy_names_and_skips_stale_buffers(tmp_path: Path) -> None:
    """The original GPT-2 files: no ``transformer.`` prefix, attention masks saved as buffers."""
    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), "gpt2", num_layers=2, seed=3)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for item in hf.iterdir():
        if item.name != "model.safetensors":
            (legacy / item.name).write_bytes(item.read_bytes())
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(hf / "model.safetensors").items()}
    tensors |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 8, 8)) for i in range(2)}
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    same_shards(convert_from_hf(legacy, tmp_path / "from-legacy"), convert_from_hf(hf, tmp_path / "from-new"))


def test_from_hf_names_a_missing_weight(tmp_path: Path) -> None:
    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), "gptneox", num_layers=2, seed=3)
    tensors = load_file(hf / "model.safetensors")
    del tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"part layer_1 has missing weights \['mlp.dense_4h_to_h.weight'\]"):
        convert_from_hf(hf, tmp_path / "shards")
    assert not list((tmp_path / "shards").glob("*"))  # checked before anything was written


# -- memory: peak resident set of a converter run on a shallow and a deep model -----------------


# The converter runs in a fresh interpreter that reports its own VmHWM at exit: a child's
# rusage would also count the memory of the process it was forked from.
_REPORT_PEAK = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    print("peak-kB", peak.split()[1])
"""


def peak_rss(args: list[str]) -> int:
    """Peak resident bytes of one converter process."""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _REPORT_PEAK, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return int(done.stdout.split("peak-kB")[-1].split()[0]) * 1024


def wide_model(folder: Path, layers: int) -> Path:
    """A GPT-NeoX of hidden size 256 (3.2 MB a layer in fp32), random weights."""
    from transformers import AutoModelForCausalLM

    from convert.tiny_model import tiny_config, train_tokenizer

    config = tiny_config("gptneox", 384, layers, hidden=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    train_tokenizer(bundled_texts()[:100]).save_pretrained(folder)
    return folder


def lora_checkpoint(shards: Path, out: Path, targets: tuple[str, ...] = ()) -> Path:
    """A LoRA checkpoint folder over ``shards`` with random adapters on every layer (B is not
    zero, so merging changes every adapted weight), built one layer at a time."""
    from modules import family_for, layer_part, load_config
    from modules.layout import copy_model_files, save_part
    from modules.lora import ADAPTER_CONFIG, LoraSpec, adapter_part
    from pipeline.stage import Stage

    config = load_config(shards)
    family = family_for(config.model_type)
    out.mkdir()
    copy_model_files(shards, out)
    generator = torch.Generator().manual_seed(0)
    for i in range(config.num_hidden_layers):
        stage = Stage(family, config, range(i, i + 1), is_first=False, is_last=False)
        stage.load_parts(str(shards))
        spec = stage.add_lora(LoraSpec(4, 8.0, 0.0, targets), seed=i)
        block = stage.layers[str(i)]
        with torch.no_grad():
            for name, param in block.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        save_part(out, adapter_part(layer_part(i)), stage.saved_state(block))
    (out / ADAPTER_CONFIG).write_text(spec.to_json(str(shards)))
    return out


@pytest.mark.parametrize("family", ["gpt2", "gptj"])  # gpt2: Conv1D keeps its weights transposed
def test_lora_merged_export_streams_what_peft_merges(family: str, tmp_path: Path) -> None:
    from convert.to_hf import _with_adapters
    from modules.lora import LoraSpec

    hf = build_tiny_model(tmp_path / "hf", bundled_texts(), family, num_layers=3, seed=2)
    shards = convert_from_hf(hf, tmp_path / "shards")
    ckpt = lora_checkpoint(shards, tmp_path / "lora")
    spec = LoraSpec.read(ckpt)[0]
    ours = load_hf_state(convert_to_hf(ckpt, tmp_path / "merged"))
    # PEFT's own merge over the whole HF model, the way the export worked before it streamed
    reference = _with_adapters(ckpt, spec, shards, None).merge_and_unload().state_dict()
    base = load_hf_state(hf)
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert changed and all(".h." in k or ".layers." in k for k in changed)  # blocks only, and they moved
    for key, value in ours.items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=0, msg=key)


def test_converters_memory_does_not_grow_with_the_model(tmp_path: Path) -> None:
    """64 more layers (200 MB more weights) cost a streaming converter (almost) no more memory:
    from_hf, to_hf, and to_hf merging LoRA adapters into the base."""
    peaks = {}
    for layers in (4, 68):
        hf = wide_model(tmp_path / f"hf{layers}", layers)
        shards, out = tmp_path / f"shards{layers}", tmp_path / f"out{layers}"
        peaks[("from_hf", layers)] = peak_rss(
            ["convert/from_hf.py", "--model-name", str(hf), "--save-dir", str(shards)]
        )
        to_hf = ["convert/to_hf.py", "--ckpt-path", str(shards), "--save-path", str(out)]  # one 200 MB shard
        peaks[("to_hf", layers)] = peak_rss(to_hf)
        lora = lora_checkpoint(shards, tmp_path / f"lora{layers}")
        merged = ["convert/to_hf.py", "--ckpt-path", str(lora), "--save-path", str(tmp_path / f"merged{layers}")]
        peaks[("to_hf merged LoRA", layers)] = peak_rss(merged)
    tools = ("from_hf", "to_hf", "to_hf merged LoRA")
    grown = {tool: (peaks[(tool, 68)] - peaks[(tool, 4)]) / 1e6 for tool in tools}
    model_mb = sum(p.stat().st_size for p in (tmp_path / "hf68").glob("*.safetensors")) / 1e6
    assert model_mb > 200
    assert all(mb < 50 for mb in grown.values()), (grown, model_mb)


def test_lora_merged_export_names_missing_adapters_before_writing(tiny_shards: Path, tmp_path: Path) -> None:
    ckpt = lora_checkpoint(tiny_shards, tmp_path / "lora")
    (ckpt / "lora_layer_3.safetensors").unlink()
    out = tmp_path / "merged"
    with pytest.raises(FileNotFoundError, match="lora_layer_3"):
        convert_to_hf(ckpt, out)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
