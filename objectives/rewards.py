"""Reward functions as TRL's GRPOTrainer calls them, and the advantages GRPO trains on.

A reward function is ``fn(prompts, completions, completion_ids, **columns) -> list[float | None]``
(keyword arguments: every other column of the prompts' records, one value per completion), named
on the command line as ``module.path:function`` or ``path/to/file.py:function``. None means that
function has no reward for that completion (a math checker on a coding prompt); a completion
that no function scores is left out of its group's baseline and gets advantage 0.

Advantages, as TRL's default (``sum_then_normalize``): the weighted sum of the functions' rewards
(None left out), less the mean of its prompt's group of ``--num-generations`` completions, over
the group's standard deviation (``--scale-rewards group``), the whole batch's (``batch``), or not
scaled (``none``); 1e-4 is added to the deviation, so a group whose completions all scored the
same gets advantages of 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from objectives.config import SCALES


@dataclass(frozen=True)
class RewardFunction:
    name: str  # the function's own name: its metrics are rewards/<name>/mean and /std
    spec: str  # as given on the command line
    fn: Callable[..., Sequence[float | None]]


def load_reward_function(spec: str) -> RewardFunction:
    """``module.path:function`` (importable from here) or ``file.py:function``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--reward-funcs {spec!r}: give module.path:function or path/to/file.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--reward-funcs {spec}: no such file {path}")
        module_name = f"reward_funcs_{path.stem}_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling find it
        try:
            loader.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's file: its failure, named, in one line
            raise ValueError(f"--reward-funcs {spec}: {path} failed to load: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:  # noqa: BLE001 - the user's module: its failure, named, in one line
            raise ValueError(f"--reward-funcs {spec}: cannot import {where} ({type(err).__name__}: {err})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"--reward-funcs {spec}: {where} has no {name}")
    if not callable(fn):
        raise ValueError(f"--reward-funcs {spec}: {where}.{name} is a {type(fn).__name__}, not a function")
    return RewardFunction(getattr(fn, "__name__", name), spec, fn)


def score(
    functions: Sequence[RewardFunction], prompts: list, completions: list, completion_ids: list[list[int]],
    columns: dict[str, list],
) -> torch.Tensor:  # fmt: skip
    """(completions, functions) rewards, NaN where a function gave None. A function that raises,
    returns another number of rewards, or a value that is not a finite number (or None) is
    refused in one line naming it and the completion."""
    count = len(completions)
    table = torch.full((count, len(functions)), math.nan, dtype=torch.float32)
    for k, reward in enumerate(functions):
        try:
            values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as err:  # noqa: BLE001 - the user's function: its failure, named, in one line
            first = (str(err).splitlines() or [""])[0]
            raise ValueError(f"reward function {reward.spec} raised {type(err).__name__}: {first}") from None
        values = list(values) if values is not None else []
        if len(values) != count:
            raise ValueError(
                f"reward function {reward.spec} returned {len(values)} rewards for {count} completions; return "
                "one per completion (None where it has no reward)"
            )
        for i, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"reward function {reward.spec} returned {value!r} for completion {i}; return a finite number "
                    "or None"
                )
            table[i, k] = float(value)
    return table


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The standard deviation with Bessel's correction, NaN left out (NaN where fewer than 2 remain)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    std = torch.where(count > 1, variance, torch.nan).sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


@dataclass(frozen=True)
class Scored:
    advantages: torch.Tensor  # (completions,)
    rewards: torch.Tensor  # (completions,) the weighted sums, NaN where no function scored
    metrics: dict[str, float]  # TRL's names: reward, reward_std, rewards/<name>/mean and /std, frac_reward_zero_std


def advantages(table: torch.Tensor, weights: Sequence[float], group: int, scale: str, names: Sequence[str]) -> Scored:
    """From the (completions, functions) rewards of ``score``, the completions in groups of
    ``group`` consecutive ones (a prompt's), each function's reward times its weight."""
    if scale not in SCALES:
        raise ValueError(f"--scale-rewards {scale!r}: choose one of {', '.join(SCALES)}")
    unscored = torch.isnan(table).all(dim=1)
    rewards = (table * torch.tensor(list(weights), dtype=table.dtype)).nansum(dim=1)
    rewards[unscored] = math.nan
    grouped = rewards.view(-1, group)
    baseline = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:  # under none the group's deviation only says which groups were all alike
        std = nanstd(grouped, dim=1).repeat_interleave(group)
    scaled = rewards - baseline
    if scale != "none":
        scaled = scaled / (std + 1e-4)
    metrics = {"reward": torch.nanmean(rewards).item(), "reward_std": nanstd(rewards).item(),
               "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean().item()}  # fmt: skip
    for k, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(table[:, k]).item()
        metrics[f"rewards/{name}/std"] = nanstd(table[:, k]).item()
    return Scored(torch.nan_to_num(scaled, nan=0.0), rewards, metrics)
