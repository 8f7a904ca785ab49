"""What the last stage trains for (``--objective``): next-token loss, DPO or SimPO on preference
pairs, or a reward model; the config declares its own flags and builds itself from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OBJECTIVES = ("lm", "dpo", "reward", "grpo")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SAMPLING_LEVELS = ("token", "sequence")
SCALES = ("group", "batch", "none")
DPO_REFERENCES = ("precomputed", "frozen")
DPO_LOSSES = ("sigmoid", "simpo")


@dataclass(frozen=True)
class GrpoSettings:
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (symmetric clipping)
    beta: float = 0.0  # the KL penalty's weight; 0: no reference model
    max_completion_length: int = 256  # dr_grpo's constant length
    kl_ratio_correction: bool = True  # TRL's use_bias_correction_kl: the KL term times the ratio
    temperature: float = 1.0  # the sampling's: completions are scored under the logits it divided
    num_generations: int = 8  # completions per prompt: a group
    reward_funcs: tuple[str, ...] = ()  # module.path:function or file.py:function each
    reward_weights: tuple[float, ...] = ()  # one per function (empty: 1 each)
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated_completions: bool = False  # a completion cut at the length trains nothing

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type {self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if self.importance_sampling_level not in SAMPLING_LEVELS:
            level = self.importance_sampling_level
            raise ValueError(f"--importance-sampling-level {level!r}: choose token or sequence")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"--epsilon must lie in (0, 1), not {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(
                f"--epsilon-high {self.epsilon_high} is below --epsilon {self.epsilon}: clip-higher raises it"
            )
        if self.beta < 0:
            raise ValueError(f"--beta must be 0 (no KL penalty) or positive, not {self.beta}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"--scale-rewards {self.scale_rewards!r}: choose one of {', '.join(SCALES)}")
        if self.num_generations < 1:
            raise ValueError(f"--num-generations must be at least 1, not {self.num_generations}")
        if self.num_generations == 1 and self.scale_rewards == "group":
            raise ValueError(
                "--num-generations 1 with --scale-rewards group: a group of one completion has no spread to "
                "normalise by (every advantage would be 0); generate 2 or more per prompt"
            )
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"--reward-weights gives {len(self.reward_weights)} weights for {len(self.reward_funcs)} "
                "--reward-funcs; give one per function or none"
            )

    @property
    def weights(self) -> tuple[float, ...]:
        return self.reward_weights or (1.0,) * len(self.reward_funcs)

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def count(self, mask: torch.Tensor) -> float:
        """What one micro-batch adds to the step's normalizer; ``mask`` (rows, seq - 1): its
        completion tokens."""
        if self.loss_type == "grpo":
            return float(mask.shape[0])
        if self.loss_type == "bnpo":
            return 1.0
        if self.loss_type == "dr_grpo":
            return float(mask.shape[0] * self.max_completion_length)
        return float(mask.sum())


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
    grpo: GrpoSettings = GrpoSettings()  # --objective grpo's (temperature and length: the sampling's)

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
        r = parser.add_argument_group("GRPO (--objective grpo: completions generated through the pipeline)")
        r.add_argument("--num-generations", type=int, default=8, help="completions per prompt (a group); "
                       "--batch-size and --micro-batch-size count completions")  # fmt: skip
        r.add_argument("--reward-funcs", nargs="+", default=[], metavar="FN",
                       help="module.path:function or file.py:function, TRL's signature: "
                       "fn(prompts, completions, completion_ids, **columns) -> list[float | None]")  # fmt: skip
        r.add_argument("--reward-weights", nargs="+", type=float, default=[], metavar="W",
                       help="one weight per reward function (default 1 each)")  # fmt: skip
        r.add_argument("--scale-rewards", choices=SCALES, default="group",
                       help="advantages over the group's reward deviation, the batch's, or unscaled")  # fmt: skip
        r.add_argument("--loss-type", choices=LOSS_TYPES, default="dapo",
                       help="how token losses average: per completion (grpo), per micro-batch (bnpo), over "
                       "completions x --max-completion-length (dr_grpo), over the batch's tokens (dapo)")  # fmt: skip
        r.add_argument("--importance-sampling-level", choices=SAMPLING_LEVELS, default="token",
                       help="token: a ratio per token; sequence: one per completion (GSPO)")  # fmt: skip
        r.add_argument("--epsilon", type=float, default=0.2, help="the ratio's clip range below (and above) 1")
        r.add_argument("--epsilon-high", type=float, default=None, help="the clip range above 1 (DAPO's "
                       "clip-higher; default --epsilon)")  # fmt: skip
        r.add_argument("--mask-truncated-completions", action="store_true",
                       help="completions cut at --max-completion-length train nothing")  # fmt: skip

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
        grpo_flags = {
            "--reward-funcs": bool(args.reward_funcs), "--reward-weights": bool(args.reward_weights),
            "--num-generations": args.num_generations != 8, "--scale-rewards": args.scale_rewards != "group",
            "--loss-type": args.loss_type != "dapo",
            "--importance-sampling-level": args.importance_sampling_level != "token",
            "--epsilon": args.epsilon != 0.2, "--epsilon-high": args.epsilon_high is not None,
            "--mask-truncated-completions": args.mask_truncated_completions,
        }  # fmt: skip
        given = [flag for flag, changed in grpo_flags.items() if changed]
        if args.objective != "grpo" and given:
            raise ValueError(f"{' and '.join(given)} apply to --objective grpo; add that or drop them")
        grpo = GrpoSettings(
            args.loss_type, args.importance_sampling_level, args.epsilon, args.epsilon_high,
            num_generations=args.num_generations, reward_funcs=tuple(args.reward_funcs),
            reward_weights=tuple(args.reward_weights), scale_rewards=args.scale_rewards,
            mask_truncated_completions=args.mask_truncated_completions,
        )  # fmt: skip
        if args.objective == "grpo" and not grpo.reward_funcs:
            raise ValueError("--objective grpo needs --reward-funcs: module.path:function or file.py:function")
        return cls(args.objective, args.dpo_beta, args.dpo_label_smoothing, args.dpo_reference, args.dpo_loss,
                   args.simpo_gamma, grpo)  # fmt: skip

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"--objective {self.name!r}: choose one of {', '.join(OBJECTIVES)}")
        if not self.beta > 0:
            raise ValueError(f"--dpo-beta must be positive, not {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--dpo-label-smoothing must lie in [0, 0.5), not {self.label_smoothing}")
