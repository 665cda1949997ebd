"""``per_sample.pt`` in a run directory: which training labels were flipped and the per-sample λ.

Written at the end of :func:`metakd.runs.run.train_run` (rank 0) when the run has label noise
(``data.label_noise``) or per-sample metaparameters (``meta.params.<name>.per_sample=true``, or
``objective=per_sample_kd``'s meta-weight network). A dict, loadable with ``torch.load(path,
weights_only=True)``:

* ``flipped``: bool (N,), whether example i of D_train has a flipped label (all False without noise);
* ``labels``: int64 (N,), the labels the student trained on (noisy where flipped);
* per per-sample metaparameter name: its final constrained values, float32 (N,) — the free entries, or the
  network's output on every training example (``beta1``, ``beta2`` and, with ``per_sample_temperature``,
  ``temperature``; :mod:`metakd.training.per_sample`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from metakd.files import atomic_torch_save
from metakd.training import per_sample

if TYPE_CHECKING:
    from metakd.training.trainer import Trainer

__all__ = ["FILENAME", "per_sample_state", "write_per_sample"]

FILENAME = "per_sample.pt"


def per_sample_state(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """The contents of ``per_sample.pt`` (None when the run has neither label noise nor per-sample λ)."""
    values = per_sample.final_values(trainer)
    flipped = trainer.splits.flipped.get("train")
    if flipped is None and not values:
        return None
    n = len(trainer.splits.train)
    if flipped is None:
        flipped = torch.zeros(n, dtype=torch.bool)
    return {
        "flipped": flipped.detach().bool().cpu(),
        "labels": trainer.splits.train.y.detach().cpu(),
        **values,
    }


def write_per_sample(trainer: Trainer, run_dir: str | Path) -> Path | None:
    """Write ``per_sample.pt`` into ``run_dir`` (atomically); its path, or None when there is nothing."""
    state = per_sample_state(trainer)
    if state is None:
        return None
    path = Path(run_dir) / FILENAME
    atomic_torch_save(state, path)
    return path
