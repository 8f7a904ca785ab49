"""What the rank server (tests/forked.py) imports once for every rank it forks: torch and its
distributed package, the project, transformers' tokenizers, configs and the modeling modules of
every family, PEFT and the data readers."""

from __future__ import annotations

import os

# as dist_clm_train.py sets it before torch is imported (c10 reads it then)
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

import torch

# One compute thread here: nothing runs in the server, and a thread pool started before a fork
# would not exist in the child (each rank sets its own count from OMP_NUM_THREADS).
torch.set_num_threads(1)

import datasets  # noqa: E402, F401  (datasets folders, parquet)
import peft  # noqa: E402, F401  (LoRA)
import torch.distributed  # noqa: E402
import transformers  # noqa: E402
from transformers import masking_utils  # noqa: E402, F401
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

import dist_clm_train  # noqa: E402, F401  (the trainer, pipeline, comm, modules)
from modules import FAMILIES  # noqa: E402

for _family in FAMILIES.values():
    for _model_type in _family.hf_model_types:
        if _model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # its modeling module, imported by the class
            getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[_model_type], None)
