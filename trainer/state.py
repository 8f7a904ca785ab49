"""What a rank's training carries from step to step besides its tensors: one ``TrainState``.

Saving a checkpoint, resuming from one and handing a joining replica (or a spare) the run's place
all go through it: ``state_dict()`` is the whole of it (what a hand-over sends), the checkpoint's
``trainer_state.json`` holds ``checkpoint_dict()`` (the same minus what only a live run has:
pending metrics rows, and the packing, which a checkpoint's data state records), and
``load_state_dict`` takes either. The weights and optimizer moments travel apart
(``Trainer.shared_tensors`` / ``load_shared``; checkpoints' safetensors files).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data.stream import resumed_packing
from trainer.precision import LossScaler


class ReplicasChanged(Exception):
    """A step of a run whose ranks regroup (--elastic, --spares) found another replica gone: no
    stage stepped; the survivors regroup and redo it (run.supervisor)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    # the stream's position after the last batch trained on (the first and last stages read data)
    data: dict | None = None
    # how examples become sequences: the flag, else documents for a new run (preference pairs:
    # none) and what a resumed run's stream recorded (every rank: the first stage's positions
    # travel unless concat)
    packing: str = "documents"
    nonfinite_run: int = 0  # consecutive steps skipped for non-finite gradients
    scaler: LossScaler | None = None  # fp16's loss scale
    # metrics rows for the reporter not yet written: who left, joined, took over, was preempted
    events: list[dict] = field(default_factory=list)

    def checkpoint_dict(self) -> dict:
        """What a checkpoint records (``trainer_state.json``, beside the run's identity)."""
        state = {"step": self.step, "data": self.data, "nonfinite_run": self.nonfinite_run}
        if self.scaler is not None:
            state["loss_scale"] = self.scaler.state_dict()
        return state

    def state_dict(self) -> dict:
        """All of it: what a live replica hands a joiner or a spare (the packing travels for the
        middle stages, whose data state is None)."""
        return {**self.checkpoint_dict(), "packing": self.packing, "events": list(self.events)}

    def load_state_dict(self, state: dict, requested_packing: str | None = None) -> None:
        """From ``state_dict()`` or a checkpoint's ``checkpoint_dict()``: a checkpoint's packing
        is its data state's (``requested_packing``, the flag, must agree); pending rows come only
        with a live hand-over's."""
        self.step = state["step"]
        self.data = state["data"]
        self.nonfinite_run = state.get("nonfinite_run", 0)
        if self.scaler is not None and state.get("loss_scale") is not None:
            self.scaler.load_state_dict(state["loss_scale"])
        self.packing = state["packing"] if "packing" in state else resumed_packing(requested_packing, state["data"])
        if "events" in state:
            self.events = list(state["events"])
