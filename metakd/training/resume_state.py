"""Restoring a checkpoint written by another metakd version, or resumed with other settings.

:meth:`metakd.training.trainer.Trainer.load_state_dict` reads the trainer's state through these two
helpers, so that a checkpoint never makes a run unresumable with a ``KeyError``:

* :func:`restore_counters` (through :func:`fill_counters`): a counter or bookkeeping entry the checkpoint lacks (``counters.*``,
  ``epoch_loss``, ``phase_seconds.*``, ...) takes the value a new trainer starts with — its documented
  default: 0 for counts and seconds, ``[0.0, 0]`` for ``epoch_loss`` (the sum and count of the epoch
  in progress), NaN for ``last_epoch_loss``, -inf for ``best.*``, nothing for ``last_eval`` — with one
  warning line naming them all;
* :func:`load_optimizer`: a torch optimizer whose saved hyperparameters lack one that this run's
  optimizer needs (``betas`` after ``train.optimizer=sgd`` became ``adam``, ``momentum`` the other way)
  is refused with one :class:`CheckpointMismatch` line naming the key and the fix.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from metakd.config import ConfigError

__all__ = ["CheckpointMismatch", "fill_counters", "load_optimizer", "restore_counters"]

log = logging.getLogger(__name__)


class CheckpointMismatch(ConfigError):
    """The checkpoint cannot be resumed with this run's settings (the message says what to change)."""


def fill_counters(state: Mapping[str, Any], fresh: Mapping[str, Any]) -> dict[str, Any]:
    """``state``'s entries of the keys of ``fresh`` (a new trainer's values, the defaults); one
    missing, or a key missing inside a dict entry, is filled from ``fresh`` with one warning."""
    missing: list[str] = []
    out: dict[str, Any] = {}
    for key, default in fresh.items():
        if key not in state:
            missing.append(key)
            out[key] = copy.deepcopy(default)
        elif isinstance(default, dict) and isinstance(state[key], Mapping):
            missing += [f"{key}.{k}" for k in default if k not in state[key]]
            out[key] = {**copy.deepcopy(default), **state[key]}
        else:
            out[key] = state[key]
    if missing:
        log.warning(
            "the checkpoint has no %s (written by another metakd version?); resuming with the "
            "defaults of a new run (0; NaN for last_epoch_loss, -inf for best)",
            ", ".join(missing),
        )
    return out


def restore_counters(trainer: Any, state: Mapping[str, Any]) -> None:
    """Set the trainer's counters and bookkeeping from a checkpoint's trainer ``state``; the entries it
    lacks keep the values the (new) trainer has (:func:`fill_counters`)."""
    fresh = {
        "counters": trainer.counters, "phase_seconds": trainer.phase_seconds, "wall_seconds": 0.0,
        "last_eval": trainer.last_eval, "best": trainer.best, "epoch_loss": trainer.epoch_loss,
        "last_epoch_loss": math.nan,
    }  # fmt: skip
    full = fill_counters(state, fresh)
    trainer.counters = {k: int(v) for k, v in full["counters"].items()}
    trainer.phase_seconds = {k: float(v) for k, v in full["phase_seconds"].items()}
    trainer.wall_base = float(full["wall_seconds"])
    trainer.last_eval = {k: float(v) for k, v in full["last_eval"].items()}
    trainer.best = {k: float(v) for k, v in full["best"].items()}
    trainer.epoch_loss = [float(full["epoch_loss"][0]), int(full["epoch_loss"][1])]
    trainer.last_epoch_loss = float(full["last_epoch_loss"])


def load_optimizer(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], what: str, setting: str
) -> None:
    """``optimizer.load_state_dict(saved)``; :class:`CheckpointMismatch` first when the saved parameter
    groups lack a hyperparameter ``optimizer`` has (the optimizer changed: torch would fail with a
    ``KeyError``, now or at the next step). ``what``: its name in the message; ``setting``: the
    config key that chooses it, with its value (``train.optimizer=adam``)."""
    missing = _missing_hyperparameters(optimizer, saved)
    if missing:
        raise CheckpointMismatch(
            f"cannot resume: the checkpoint's {what} has no {', '.join(map(repr, missing))}, which "
            f"{setting} needs (the optimizer changed since the checkpoint was saved); resume with "
            "the original optimizer settings (those of the run's config.yaml), or start a new --out DIR"
        )
    optimizer.load_state_dict(dict(saved))


def _missing_hyperparameters(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> list[str]:
    """Hyperparameters of ``optimizer``'s groups that the saved groups lack, after the defaults its
    ``__setstate__`` fills in (those torch added in later versions: foreach, fused, ...)."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return []  # torch's own load_state_dict names this problem
    probe = copy.copy(optimizer)  # __setstate__ on a copy: the optimizer itself is not touched
    bare = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in groups]
    try:
        probe.__setstate__({"state": {}, "param_groups": bare})
    except Exception:  # an optimizer that cannot be probed: torch's load decides
        return []
    need = [set(g) - {"params"} for g in optimizer.param_groups]
    return sorted(set().union(*(n - set(g) for n, g in zip(need, probe.param_groups))))
