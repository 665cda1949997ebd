"""Learning-rate schedules of the student optimizer as pure functions of the step: γ_t = γ · f(t).

The standard KD recipes (e.g. SGD 0.05, momentum 0.9, weight decay 5e-4, ×0.1 at epochs 150/180/210 of
240; or cosine decay after a linear warm-up) as one factor f(t) of the 0-based update index t, so the
real optimizer (``group["lr"] = γ·f(t)`` before update t) and its differentiable twin inside an η-step
unroll (:func:`metakd.functional.optim.sgd` / ``adam`` with ``schedule=f``: update t of the unroll uses
f(t), t read from the optimizer state's step counter) take the very same learning rates. A learned
γ (``meta.params.lr``) is multiplied by the same f(t), so its hypergradient stays exact.

    warm-up (t < W):   f(t) = s + (1 - s)·t / W                            (torch LinearLR)
    constant:          f(t) = 1
    cosine:            f(t) = m + (1 - m)·(1 + cos(π (t - W) / (N - W))) / 2   (CosineAnnealingLR, η_min = m·γ)
    multistep:         f(t) = g^(number of milestones M_i <= t)           (MultiStepLR)

with N the run's total steps, W the warm-up steps, s the warm-up's start factor, m the cosine floor
ratio, g the decay factor. Why not ``torch.optim.lr_scheduler`` objects themselves: they count their
own ``step()`` calls and keep state; the unroll needs f at steps it has not taken yet (t..t+η-1)
without touching the real scheduler, and a pure function needs no checkpoint entry. The tests check
f against torch's schedulers step by step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["KINDS", "LrSchedule"]

KINDS = ("constant", "cosine", "multistep")


@dataclass(frozen=True)
class LrSchedule:
    """f(t) of the module docstring; call it with the 0-based update index t."""

    kind: str = "constant"
    total_steps: int = 1
    milestones: tuple[
        int, ...
    ] = ()  # multistep: update indices where the factor is multiplied by gamma
    gamma: float = 0.1
    min_ratio: float = 0.0  # cosine: the factor's floor
    warmup_steps: int = 0
    warmup_start: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {list(KINDS)}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"lr schedule needs total_steps >= 1 and warmup_steps >= 0, got "
                f"{self.total_steps} and {self.warmup_steps}"
            )
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"lr milestones must be increasing, got {list(self.milestones)}")

    @classmethod
    def of(
        cls,
        kind: str,
        *,
        total_steps: int,
        steps_per_epoch: int,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        min_ratio: float = 0.0,
        warmup_epochs: float = 0.0,
        warmup_start: float = 0.1,
    ) -> LrSchedule:
        """A schedule whose milestones and warm-up are given in epochs (the recipes' unit)."""
        return cls(
            kind,
            total_steps,
            tuple(int(m) * steps_per_epoch for m in milestones),
            gamma,
            min_ratio,
            round(warmup_epochs * steps_per_epoch),
            warmup_start,
        )

    @property
    def trivial(self) -> bool:
        """f(t) = 1 for every t: no schedule at all."""
        return self.kind == "constant" and self.warmup_steps == 0

    def __call__(self, t: int) -> float:
        w = self.warmup_steps
        if t < w:
            return self.warmup_start + (1.0 - self.warmup_start) * t / w
        if self.kind == "cosine":
            span = max(self.total_steps - w, 1)
            p = min(t - w, span) / span
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "multistep":
            return float(self.gamma ** bisect.bisect_right(self.milestones, t))
        return 1.0
