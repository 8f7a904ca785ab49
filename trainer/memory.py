"""Peak memory of a rank over one training step, for ``peak_mem_bytes`` in metrics.jsonl.

CUDA: the caching allocator's peak of allocated bytes (``max_memory_allocated``), reset each
step. CPU: the process's peak resident set (``VmHWM``), which Linux resets when "5" is written to
``/proc/self/clear_refs``; where that cannot be written the peak covers the whole run so far.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._resettable = device.type == "cuda"
        if device.type == "cpu":
            try:
                _CLEAR_REFS.write_text("5")
                self._resettable = True
            except OSError as err:
                log.info("peak memory covers the whole run: cannot reset it here (%s)", err.strerror)

    def reset(self) -> None:
        """Start a new window: the next ``peak_bytes`` reports the highest use from now."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            _CLEAR_REFS.write_text("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self._resettable:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def static_bytes(stage: torch.nn.Module, trained: list[torch.nn.Parameter], optimizer: str) -> dict[str, int]:
    """What a stage holds before any activation: weights, gradients and optimizer state (AdamW
    keeps two fp32 moments per trained value; bitsandbytes' 8-bit AdamW two bytes)."""
    moment_bytes = 2 if optimizer == "8bit-adam" else 8
    return {
        "parameters": sum(p.nbytes for p in stage.parameters()),
        "gradients": sum(p.nbytes for p in trained),
        "optimizer": moment_bytes * sum(p.numel() for p in trained),
    }
