"""Per-sample metaparameters in the report: how well they find the label noise (issue 32).

A run with label noise or per-sample metaparameters has ``per_sample.pt`` (written by
``metakd.runs.per_sample``; read here with ``torch.load(..., weights_only=True)``): ``flipped`` (bool
[N]), ``labels`` and, per per-sample metaparameter name, its final constrained values (float [N]). For
every run whose ``flipped`` has at least one flipped and one clean example and that has at least one
per-sample metaparameter, :func:`per_sample_figure` draws the values of clean vs flipped examples
(``per_sample.png``: one row per run, one panel per name) and :func:`section` writes the AUROC of
separating flipped from clean by each value (:func:`auroc`, scikit-learn's ``roc_auc_score`` with the
flipped examples as the positive class).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metakd.reporting.loading import Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FILENAME", "PerSample", "auroc", "load_per_sample", "per_sample_figure", "section"]

FILENAME = "per_sample.pt"
_NOT_VALUES = ("flipped", "labels")
LOW_MEANS_FLIPPED = frozenset({"beta1", "weight"})
"""Names whose LOW values should mark a flipped example (β1 weighs the label: a wrong label should get
a low weight; a network's example weight vᵢ), so their AUROC scores -value; every other name scores
+value (β2: lean on the teacher; T: a softer target)."""

log = logging.getLogger(__name__)


@dataclass
class PerSample:
    """One run's ``per_sample.pt``: the flipped mask and the per-sample metaparameters' final values."""

    run: Run
    flipped: np.ndarray  # bool [N]
    values: dict[str, np.ndarray]  # name -> float [N]

    @property
    def n_flipped(self) -> int:
        return int(self.flipped.sum())

    @property
    def n_clean(self) -> int:
        return int((~self.flipped).sum())


def load_per_sample(run: Run) -> PerSample | None:
    """The run's ``per_sample.pt`` when it can show how the values find the noise: a ``flipped``
    mask with at least one flipped and one clean example and at least one per-sample metaparameter
    of the same length; else None (an unreadable file: None with a warning)."""
    path = Path(run.path) / FILENAME
    if not path.is_file():
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file must not stop the report
        log.warning("skipped the unreadable %s: %s", path, exc)
        return None
    if not isinstance(state, dict) or not isinstance(state.get("flipped"), torch.Tensor):
        return None
    flipped = state["flipped"].detach().cpu().bool().reshape(-1).numpy()
    values = {
        str(k): v.detach().cpu().double().reshape(-1).numpy()
        for k, v in state.items()
        if k not in _NOT_VALUES
        and isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and v.numel() == flipped.size
    }
    if not values or not flipped.any() or flipped.all():
        return None
    return PerSample(run, flipped, values)


def auroc(values: np.ndarray, flipped: np.ndarray, name: str) -> float:
    """AUROC of separating flipped (positive) from clean examples by ``values``: the score is
    ``-values`` for names in :data:`LOW_MEANS_FLIPPED` (β1), ``+values`` otherwise. 1: every flipped
    example scores above every clean one; 0.5: no separation."""
    from sklearn.metrics import roc_auc_score

    score = -np.asarray(values, dtype=float) if name in LOW_MEANS_FLIPPED else np.asarray(values)
    return float(roc_auc_score(np.asarray(flipped, dtype=bool), score))


def _names(entries: Sequence[PerSample]) -> list[str]:
    return list(dict.fromkeys(n for e in entries for n in e.values))


def per_sample_figure(entries: Sequence[PerSample], labels: Sequence[str]) -> Figure | None:
    """Histograms (density, shared bins) of each per-sample metaparameter's final values over clean
    and flipped examples, counts in the legend; one row per run (``labels``), one column per name."""
    if not entries:
        return None
    from matplotlib.figure import Figure

    names = _names(entries)
    fig = Figure(figsize=(4.2 * len(names), 3.0 * len(entries) + 0.4), layout="constrained")
    axes = fig.subplots(len(entries), len(names), squeeze=False)
    for row, (entry, label) in zip(axes, zip(entries, labels, strict=True), strict=True):
        for ax, name in zip(row, names, strict=True):
            v = entry.values.get(name)
            if v is None:
                ax.set_axis_off()
                continue
            bins = np.histogram_bin_edges(v[np.isfinite(v)], bins=30)
            for mask, what, color in (
                (~entry.flipped, "clean", "tab:blue"),
                (entry.flipped, "flipped", "tab:red"),
            ):
                ax.hist(v[mask], bins=bins, density=True, histtype="stepfilled", alpha=0.35,
                        color=color, edgecolor=color, label=f"{what} (n={int(mask.sum())})")  # fmt: skip
            ax.set_title(
                f"{label}\n{name}: AUROC {auroc(v, entry.flipped, name):.3f}", fontsize="small"
            )
            ax.set_xlabel(f"final {name}")
            ax.set_ylabel("density")
            ax.legend(fontsize="small")
    return fig


CAPTION = (
    "Final per-sample metaparameters of the training examples whose label was flipped vs the clean "
    "ones (density histograms on shared bins; counts in the legend), one row per run with "
    "`per_sample.pt`."
)


def section(entries: Sequence[PerSample], out: str | Path) -> str:
    """The report's markdown: the figure (``per_sample.png``, written by the caller) and the AUROC
    table; '' when no run has a usable ``per_sample.pt``."""
    if not entries:
        return ""
    names = _names(entries)
    heads = [
        f"AUROC {n} (score −{n}: low ⇒ flipped)"
        if n in LOW_MEANS_FLIPPED
        else f"AUROC {n} (score +{n}: high ⇒ flipped)"
        for n in names
    ]
    lines = [
        "| run | method | clean | flipped | " + " | ".join(heads) + " |",
        "|---|---|---:|---:|" + "---:|" * len(names),
    ]
    for e in entries:
        cells = [f"{auroc(e.values[n], e.flipped, n):.3f}" if n in e.values else "" for n in names]
        lines.append(
            f"| {os.path.relpath(e.run.path, out)} | {e.run.method} | {e.n_clean} | {e.n_flipped} | "
            + " | ".join(cells)
            + " |"
        )
    return (
        "## Per-sample metaparameters: how well they find the noise\n\n"
        f"{CAPTION}\n\n![per_sample](per_sample.png)\n\n"
        "AUROC of separating the flipped training examples (positive class) from the clean ones by "
        "each final per-sample value (`sklearn.metrics.roc_auc_score`); the score is −β1 (a wrong "
        "label should get a LOW weight) and +value for the other names, as each column's header "
        "says. 1: the values find every flipped label; 0.5: no better than chance; below 0.5: the "
        "opposite direction.\n\n" + "\n".join(lines) + "\n\n"
    )
