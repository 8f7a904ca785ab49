"""What the last stage trains for (``--objective``): next-token loss, DPO or SimPO on preference
pairs, or a reward model; the config declares its own flags and builds itself from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

OBJECTIVES = ("lm", "dpo", "reward")
DPO_REFERENCES = ("precomputed", "frozen")
DPO_LOSSES = ("sigmoid", "simpo")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the last stage trains for: next-token loss (lm), or on preference pairs
    (objectives/) DPO, SimPO or a reward model. Declares its own flags and builds itself from them."""

    name: str = "lm"
    beta: float = 0.1  # --dpo-beta
    label_smoothing: float = 0.0  # --dpo-label-smoothing (conservative DPO)
    reference: str = "precomputed"  # --dpo-reference
    loss: str = "sigmoid"  # --dpo-loss: DPO's, or SimPO's (length-normalised, no reference)
    simpo_gamma: float = 0.5  # --simpo-gamma: SimPO's target margin

    @property
    def needs_reference(self) -> bool:
        """DPO's loss compares with a reference model's log-probs (SimPO's does not)."""
        return self.name == "dpo" and self.loss == "sigmoid"

    @property
    def precomputed_reference(self) -> bool:
        """The reference's log-probs come from one pass before training (else each step's own)."""
        return self.needs_reference and self.reference == "precomputed"

    def describe(self) -> str:
        """The objective as a run's identity records it."""
        return self.name if self.name != "dpo" or self.loss == "sigmoid" else f"dpo:{self.loss}"

    @property
    def pairs(self) -> bool:
        """Whether the data are preference pairs, each drawn as two sequences of one micro-batch."""
        return self.name in ("dpo", "reward")

    @property
    def reward_model(self) -> bool:
        """A scalar score head on the last stage in place of the output layer."""
        return self.name == "reward"

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("objective")
        g.add_argument(
            "--objective",
            choices=OBJECTIVES,
            default="lm",
            help="lm: next-token loss; on prompt/chosen/rejected pairs (--batch-size and --micro-batch-size then "
            "count pairs): dpo, Direct Preference Optimisation, or reward, a reward model (a scalar head trained "
            "to score the chosen response above the rejected)",
        )
        g.add_argument(
            "--dpo-beta", type=float, default=0.1, help="DPO's beta: how far the policy may move from the reference"
        )
        g.add_argument(
            "--dpo-label-smoothing", type=float, default=0.0,
            help="conservative DPO: the assumed chance that a pair's preference is flipped, in [0, 0.5)",
        )  # fmt: skip
        g.add_argument(
            "--dpo-reference",
            choices=DPO_REFERENCES,
            default="precomputed",
            help="precomputed: the starting weights' log-probs of every pair (LoRA: adapters off), computed once "
            "before the first step and kept in the checkpoint folder; frozen: computed for each step's pairs by a "
            "forward of a frozen copy of the starting weights (LoRA: this stage with its adapters off, no copy)",
        )
        g.add_argument(
            "--dpo-loss",
            choices=DPO_LOSSES,
            default="sigmoid",
            help="sigmoid: DPO's loss; simpo: SimPO's (Meng et al. 2024), the mean log-prob of each response "
            "(no reference model), beta times their difference less --simpo-gamma",
        )
        g.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO's target reward margin")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ObjectiveConfig:
        dpo_flags = {
            "--dpo-beta": args.dpo_beta != 0.1,
            "--dpo-label-smoothing": args.dpo_label_smoothing != 0.0,
            "--dpo-loss": args.dpo_loss != "sigmoid",
            "--dpo-reference": args.dpo_reference != "precomputed",
        }
        given = [flag for flag, changed in dpo_flags.items() if changed]
        if args.objective != "dpo" and given:
            verb, them = ("apply", "them") if len(given) > 1 else ("applies", "it")
            raise ValueError(f"{' and '.join(given)} {verb} to --objective dpo; add that or drop {them}")
        if args.simpo_gamma != 0.5 and args.dpo_loss != "simpo":
            raise ValueError("--simpo-gamma applies to --dpo-loss simpo; add it or drop --simpo-gamma")
        if args.dpo_reference != "precomputed" and args.dpo_loss == "simpo":
            raise ValueError("--dpo-loss simpo uses no reference model: drop --dpo-reference")
        return cls(args.objective, args.dpo_beta, args.dpo_label_smoothing, args.dpo_reference, args.dpo_loss,
                   args.simpo_gamma)  # fmt: skip

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"--objective {self.name!r}: choose one of {', '.join(OBJECTIVES)}")
        if not self.beta > 0:
            raise ValueError(f"--dpo-beta must be positive, not {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--dpo-label-smoothing must lie in [0, 0.5), not {self.label_smoothing}")
