"""The trainer's metrics rows (``metrics.jsonl``, format in docs/architecture.md) and when they are written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metakd.config import Config
from metakd.training.per_sample import compact
from metakd.training.schedule import plain

if TYPE_CHECKING:
    from metakd.training.trainer import Trainer

__all__ = ["log_due", "metrics_row"]


def log_due(cfg: Config, phase: str, s: int, meta_step: bool) -> bool:
    """Whether step s (0-based) writes a metrics row outside the forced ones (eval, window
    boundary, forecast error, non-finite loss).

    Rows follow ``train.log_every`` (a row per step would dominate tiny runs). With
    ``meta.every = k > 1`` meta steps fall on s ≡ 0 (mod k) while plain rows fall on
    s + 1 ≡ 0 (mod log_every), so they would rarely meet and the hypergradients would go
    unlogged: there, in optimize phases, the rows are the meta steps, every
    ⌈log_every / k⌉-th one (about one row per log_every steps, each with its hypergradient).
    """
    every, log_every = cfg.meta.every, cfg.train.log_every
    if every > 1 and phase == "optimize":
        return meta_step and (s // every) % -(-log_every // every) == 0
    return (s + 1) % log_every == 0


def metrics_row(
    tr: Trainer, s: int, phase: str, loss: float, step_time: float,
    grads: Mapping[str, Tensor] | None, extrap: Tensor | None, err: Tensor | None,
    ev: Mapping[str, float],
) -> dict[str, Any]:  # fmt: skip
    """The row of step s: λ after it, its hypergradient (if a meta step), forecasts, evaluations."""
    meta = tr.meta
    specs = meta.specs if meta is not None else {}  # per-sample λ: logged as their means
    norm = None
    if grads is not None:
        norm = float(
            torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads.values()]))
        )
    row: dict[str, Any] = {
        "step": s + 1,
        "epoch": s // tr.steps_per_epoch + 1,
        "phase": phase,
        "train_loss": loss,
        "step_time": step_time,
        "meta": meta.values() if meta is not None else tr.lambdas(),
        "meta_raw": meta.raw_values() if meta is not None else None,
        "hypergrad": plain(compact(grads, specs)),
        "hypergrad_norm": norm,
        "meta_lr": tr.meta_lr(s) if tr.meta_opt is not None else None,
        "meta_forecast": None if extrap is None else plain(compact(tr.vec().unflat(extrap), specs)),
        "forecast_error": None if err is None else plain(compact(tr.vec().unflat(err), specs)),
    }
    row.update(ev)
    return row
