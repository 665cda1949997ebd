"""The report's figures: the paper's Figs. 2–11 (accuracy, metaparameters, sensitivity, sweeps, cost).

Curves of several seeds are aligned by step: each run is linearly interpolated onto the union of the
eval steps inside the step range that every run covers; bands are the mean ± sample std (ddof=1).

Figures use matplotlib's object-oriented :class:`~matplotlib.figure.Figure` API (rendered by Agg,
no pyplot, no global backend switch), so this runs headless.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from metakd.reporting.loading import METHOD_ORDER, Run, _method_key, _scalar

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["FIGURES", "make_figures"]

FIGURES = ("accuracy", "metaparams", "sensitivity", "sweep", "cost")

FORECAST_LABEL = "forecaster's prediction of λ"
"""The dashed line of the metaparameter figure (not the method named ``forecast``)."""


def _align(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate runs onto shared steps: the union of their steps inside the range all cover.
    Returns steps ``(S,)`` and values ``(R, S)`` (S = 0 when the runs do not overlap)."""
    curves = [c for c in curves if c[0].size]
    if not curves:
        return np.zeros(0), np.zeros((0, 0))
    lo = max(s[0] for s, _ in curves)
    hi = min(s[-1] for s, _ in curves)
    grid = np.unique(np.concatenate([s for s, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    return grid, np.stack([np.interp(grid, s, v) for s, v in curves])


def _colors(methods: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    ordered = sorted(set(methods), key=_method_key)
    return {
        m: cmap(_method_key(m)[0] if m in METHOD_ORDER else i % 10) for i, m in enumerate(ordered)
    }


_MARKERS = "osD^vPX*"
"""One marker per method, so curves of one evaluation (a point each) stay visible and tell apart
even where two methods' points coincide."""

_FEW = 25
"""Curves with at most this many points are drawn with markers on every point."""


def _markers(methods: Iterable[str]) -> dict[str, str]:
    ordered = sorted(set(methods), key=_method_key)
    return {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(ordered)}


def _no_data(ax: Axes) -> None:
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], linestyle="none", label="no data")], fontsize="small")


def _legend(ax: Axes, **kwargs: Any) -> None:
    """A legend inside ``ax`` (scatter panels: matplotlib's "best" place avoids the points)."""
    if kwargs.get("handles") or ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", **kwargs)
    else:
        _no_data(ax)


def _legend_outside(ax: Axes) -> None:
    """A legend right of ``ax``, clear of its data (constrained layout makes room for it)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        _no_data(ax)


def _figure_legend(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend for panels that share their entries, below them, never over a line; an axes
    without any entry says "no data"."""
    entries: dict[str, Any] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if not handles:
            _no_data(ax)
        for h, lab in zip(handles, labels, strict=True):
            entries.setdefault(lab, h)
    if entries:
        ncols = min(len(entries), 4 if max(len(k) for k in entries) < 40 else 2)
        fig.legend(
            list(entries.values()), list(entries), loc="outside lower center", ncols=ncols,
            fontsize="small",
        )  # fmt: skip


def _band(
    ax: Axes,
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    color: Any,
    label: str,
    marker: str = "o",
    dodge: float = 0.0,
) -> None:
    """Mean line ± sample-std band of aligned curves; markers on a curve of few points, and a
    curve of one point (runs evaluated once) as that point with a ± std error bar, its step moved
    by the fraction ``dodge`` so that methods evaluated at the same step do not hide each other."""
    steps, values = _align(curves)
    if not steps.size:
        return
    n = values.shape[0]
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if n > 1 else None
    label = f"{label} (n={n})"
    if steps.size == 1:
        ax.errorbar(steps * (1 + dodge), mean, yerr=std, color=color, marker=marker, ms=7, capsize=4,
                    linestyle="none", label=label)  # fmt: skip
        return
    few = steps.size <= _FEW
    ax.plot(steps, mean, color=color, lw=1.8, label=label, marker=marker if few else None, ms=4)
    if std is not None:
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def _log_x(ax: Axes) -> None:
    """Log x-axis with plain tick labels (0.5, 1, 2 rather than 5x10^-1)."""
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _by_method(runs: Iterable[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: _method_key(kv[0])))


def _accuracy_figure(runs: Sequence[Run], logx: bool) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), layout="constrained")
    groups = _by_method(runs)
    colors, markers = _colors(groups), _markers(groups)
    axes = fig.subplots(1, 2)
    for ax, key, split in zip(
        axes, ("val_accuracy", "test_accuracy"), ("Validation", "Test"), strict=True
    ):
        for i, (method, group) in enumerate(groups.items()):
            dodge = 0.02 * (i - (len(groups) - 1) / 2)
            curves = [r.series(key) for r in group]
            _band(ax, curves, colors[method], method, markers[method], dodge)
        if logx:
            ax.set_xscale("log")
        elif ax.has_data() and ax.dataLim.x1 > 0:
            ax.set_xlim(0, 1.05 * ax.dataLim.x1)
        ax.set(xlabel="iteration (training step)", ylabel=f"{split.lower()} accuracy")
        ax.set_title(f"{split} accuracy vs iteration (mean ± std over runs)")
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    return fig


def _meta_names(runs: Sequence[Run]) -> list[str]:
    return list(
        dict.fromkeys(
            n
            for r in runs
            for row in r.rows
            if isinstance(row.get("meta"), Mapping)
            for n in row["meta"]
        )
    )


def _spans(run: Run) -> list[tuple[float, float]]:
    """[start, end) step ranges of the predicted windows.

    From the run's forecast schedule when its config has one (0-based step s is predicted when
    ⌊s/W⌋ mod (O+P) >= O; rows use 1-based steps), else from contiguous ``phase == "predict"`` rows
    (logged rows can be sparser than the windows, so the schedule is preferred)."""
    window, opt, pred = (run.setting(f"forecast.{k}") for k in ("window", "optimize", "predict"))
    last_step = max((float(r["step"]) for r in run.rows if "step" in r), default=0.0)
    if all(isinstance(v, int) and v > 0 for v in (window, opt, pred)) and last_step > 0:
        cycle = (opt + pred) * window
        out: list[tuple[float, float]] = []
        for c in range(0, int(last_step), cycle):
            a = c + opt * window
            if a < last_step:
                out.append((float(a), float(min(c + cycle, last_step))))
        return out
    by_step = {float(r["step"]): r.get("phase") for r in run.rows if "step" in r}
    steps = sorted(by_step)
    gap = float(np.median(np.diff(steps))) if len(steps) > 1 else 1.0
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for i, s in enumerate(steps):
        if by_step[s] != "predict":
            continue
        if start is None:
            start = s
        last = i + 1 == len(steps)
        if last or by_step[steps[i + 1]] != "predict":
            spans.append((start, s + gap if last else steps[i + 1]))
            start = None
    return spans


def _broken(run: Run, steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert NaNs between forecast points that other rows of ``run`` separate, so each
    forecast window is drawn as its own segment."""
    if steps.size < 2:
        return steps, values
    logged = np.array(sorted({float(r["step"]) for r in run.rows if "step" in r}))
    between = np.searchsorted(logged, steps[1:], "left") - np.searchsorted(
        logged, steps[:-1], "right"
    )
    cut = np.nonzero(between > 0)[0] + 1
    return np.insert(steps, cut, np.nan), np.insert(values, cut, np.nan)


def _constrain(raw: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """v = c(r) of a ``meta.params`` spec from config.yaml (numpy twin of metaparams.constrain)."""
    lo, hi = float(spec.get("lo", 0.0)), float(spec.get("hi", 1.0))
    kind = spec.get("constraint", "sigmoid")
    if kind == "sigmoid":
        return lo + (hi - lo) / (1.0 + np.exp(-raw))
    if kind == "softplus":
        return lo + np.logaddexp(0.0, raw)
    return np.exp(raw) if kind == "exp" else raw


def _forecast_values(run: Run, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The run's ``meta_forecast`` of ``name`` as constrained λ. The forecaster extrapolates the
    raw values (``forecast.target: values``, mapped through the constraint of ``meta.params``) or
    the hypergradients (``target: gradients``: not a λ, nothing is returned)."""
    steps, values = run.series("meta_forecast", name)
    target = run.setting("forecast.target") or run.summary.get("forecast_target") or "values"
    spec = ((run.config.get("meta") or {}).get("params") or {}).get(name)
    if target != "values" or spec is None:
        return np.zeros(0), np.zeros(0)
    return steps, _constrain(values, spec)


def _metaparams_figure(runs: Sequence[Run]) -> Figure | None:
    from matplotlib.figure import Figure

    names = _meta_names(runs)
    if not names:
        return None
    groups = _by_method(r for r in runs if any("meta" in row for row in r.rows))
    colors = _colors(groups)
    rep = next((r for r in runs if any(row.get("phase") == "predict" for row in r.rows)), None)
    if rep is None:
        rep = next((r for r in runs if any(row.get("meta_forecast") for row in r.rows)), None)
    constant = {  # groups of constant λ (fixed, random, search trials): a mean of them is no run's
        m: len(g) > 1 and all(np.ptp(v) == 0 for r in g for n in names
                              if (v := r.series("meta", n)[1]).size)
        for m, g in groups.items()
    }  # fmt: skip
    fig = Figure(figsize=(5 * len(names), 5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names, strict=True):
        spans = _spans(rep) if rep is not None else []
        if len(spans) > 60:
            # hundreds of narrow bands alias into a moiré pattern; say it instead of drawing it
            width = spans[0][1] - spans[0][0]
            ax.plot(
                [], [], " ", label=f"{len(spans)} predicted windows of {width:g} steps (not shaded)"
            )
        else:
            for i, (a, b) in enumerate(spans):
                ax.axvspan(
                    a,
                    b,
                    color="0.6",
                    alpha=0.18,
                    lw=0,
                    label="predicted window" if i == 0 else None,
                )
        for method, group in groups.items():
            curves = [r.series("meta", name) for r in group]
            if constant[method]:
                for i, (steps, values) in enumerate(curves):
                    label = f"{method} ({len(group)} runs, constant λ)" if i == 0 else None
                    ax.plot(steps, values, color=colors[method], lw=1.2, alpha=0.7, label=label)
                continue
            for steps, values in curves:
                ax.plot(steps, values, color=colors[method], lw=0.7, alpha=0.35)
            steps, values = _align(curves)
            if steps.size:
                ax.plot(
                    steps,
                    values.mean(axis=0),
                    color=colors[method],
                    lw=2.2,
                    label=f"{method} (n={len(group)})",
                )
        if rep is not None:
            fs, fv = _forecast_values(rep, name)
            if fs.size:
                ts, tv = rep.series("meta", name)
                ax.plot(
                    ts,
                    tv,
                    color="black",
                    lw=0.9,
                    label=f"trajectory ({rep.method} seed {rep.seed})",
                )
                ax.plot(
                    *_broken(rep, fs, fv),
                    color="black",
                    lw=1.6,
                    ls="--",
                    marker="x",
                    ms=4,
                    label=FORECAST_LABEL,
                )
        ax.set(xlabel="iteration (training step)", ylabel=f"{name} (constrained)")
        lines = "one line per run" if all(constant.values()) else "thin: runs, bold: mean"
        ax.set_title(f"{name} vs iteration ({lines})")
        ax.ticklabel_format(axis="y", useOffset=False)  # 0.65003, not 1e-5 + 6.5e-1
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    return fig


def _sensitivity_figure(runs: Sequence[Run]) -> Figure | None:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    pts = [
        (r, r.summary["meta"], float(r.summary["test_accuracy"]))
        for r in runs
        if r.base_method in ("random", "fixed")
        and isinstance(r.summary.get("meta"), Mapping)
        and r.summary.get("test_accuracy") is not None
    ]
    if not pts:
        return None
    names = [n for n in pts[0][1] if all(_scalar(m.get(n)) is not None for _, m, _ in pts)]
    temp = "temperature" if "temperature" in names else None
    others = [n for n in names if n != temp]
    acc = np.array([a for _, _, a in pts])
    ncols = 1 + (temp is not None) + (temp is not None and bool(others))
    fig = Figure(figsize=(5 * ncols, 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, ncols))
    ax = axes[0]
    for marker, name in zip("os^vD", others, strict=False):
        ax.scatter([_scalar(m[name]) for _, m, _ in pts], acc, marker=marker, alpha=0.7, label=name)
    ax.set(xlabel="metaparameter value (constrained)", ylabel="final test accuracy")
    ax.set_title("Final test accuracy vs " + ", ".join(others) if others else "Final test accuracy")
    ax.grid(alpha=0.3)
    _legend(ax)
    if temp is not None:
        tvals = np.array([_scalar(m[temp]) for _, m, _ in pts])
        ax = axes[1]
        ax.scatter(tvals, acc, color="tab:red", alpha=0.7, label=f"{len(pts)} random/fixed-λ runs")
        _log_x(ax)
        ax.set(xlabel="temperature T (log scale)", ylabel="final test accuracy")
        ax.set_title("Final test accuracy vs temperature")
        ax.grid(alpha=0.3)
        _legend(ax)
        if others:
            beta = "beta2" if "beta2" in others else others[-1]
            ax = axes[2]
            sc = ax.scatter(tvals, [_scalar(m[beta]) for _, m, _ in pts], c=acc, cmap="viridis")
            fig.colorbar(sc, ax=ax, label="final test accuracy")
            _log_x(ax)
            ax.set(xlabel="temperature T (log scale)", ylabel=beta)
            ax.set_title(f"{beta} vs temperature, coloured by test accuracy")
            ax.grid(alpha=0.3)
            # a grey proxy: the first point's colour would pass for one accuracy
            _legend(ax, handles=[Line2D([], [], color="0.45", marker="o", linestyle="none",
                                        label=f"{len(pts)} runs (colour: accuracy)")])  # fmt: skip
    return fig


_SWEEPS: tuple[tuple[str, str, Callable[[Run], Any]], ...] = (
    ("window", "forecast window size", lambda r: r.setting("forecast.window")),
    (
        "n",
        "n = optimize + predict windows",
        lambda r: (
            (r.setting("forecast.optimize") or 0) + (r.setting("forecast.predict") or 0) or None
        ),
    ),
)


def _sweep_figure(runs: Sequence[Run]) -> Figure | None:
    from matplotlib.figure import Figure

    fc = [r for r in runs if r.base_method == "forecast"]
    dims = [(key, title, fn) for key, title, fn in _SWEEPS if len({fn(r) for r in fc} - {None}) > 1]
    if not dims:
        return None
    fig = Figure(figsize=(6 * len(dims), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(dims)))
    for ax, (key, title, fn) in zip(axes, dims, strict=True):
        values = sorted({fn(r) for r in fc} - {None})
        colors = _colors([f"{key}={v}" for v in values])
        markers = _markers([f"{key}={v}" for v in values])
        for v in values:
            label = f"{key}={v}"
            curves = [r.series("test_accuracy") for r in fc if fn(r) == v]
            _band(ax, curves, colors[label], label, markers[label])
        pooled = " (other settings pooled)" if len(dims) > 1 else ""
        ax.set(xlabel="iteration (training step)", ylabel="test accuracy")
        ax.set_title(f"Forecast runs: test accuracy by {title}{pooled}")
        ax.grid(alpha=0.3)
        _legend_outside(ax)
    return fig


_COST_PANELS = (("wall_seconds", "wall time (s)"), ("hypergradient_steps", "hypergradient steps"))


def _cost_figure(runs: Sequence[Run]) -> Figure:
    """Final test accuracy vs wall time, and vs hypergradient steps where a run took any (a
    fixed-λ-only set of runs has no such panel: every point would sit at 0)."""
    from matplotlib.figure import Figure

    def has(key: str) -> bool:
        return any(_scalar(r.summary.get(key)) for r in runs)

    panels = [p for i, p in enumerate(_COST_PANELS) if i == 0 or has(p[0])]
    fig = Figure(figsize=(6 * len(panels), 5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    groups = _by_method(runs)
    colors, markers = _colors(groups), _markers(groups)
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        for method, group in groups.items():
            pts = np.array(
                [
                    (float(r.summary[key]), float(r.summary["test_accuracy"]))
                    for r in group
                    if r.summary.get(key) is not None and r.summary.get("test_accuracy") is not None
                ]
            ).reshape(-1, 2)
            if not len(pts):
                continue
            ax.scatter(pts[:, 0], pts[:, 1], color=colors[method], alpha=0.35, s=14)
            err = pts.std(axis=0, ddof=1) if len(pts) > 1 else np.zeros(2)
            mean = pts.mean(axis=0)
            ax.errorbar(
                mean[0],
                mean[1],
                xerr=err[0],
                yerr=err[1],
                color=colors[method],
                marker=markers[method],
                capsize=3,
                lw=1.5,
                label=f"{method} (n={len(pts)})",
            )
        ax.set(xlabel=xlabel, ylabel="final test accuracy")
        ax.set_title(f"Final test accuracy vs {xlabel} (mean ± std)")
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    return fig


def make_figures(runs: Sequence[Run], *, logx: bool = False) -> dict[str, Figure]:
    """The report's figures by name (``accuracy``, ``metaparams``, ``sensitivity``, ``sweep``,
    ``cost``); a figure without data (no metaparameter rows, no random/fixed runs, no forecast runs
    differing in window or n) is left out."""
    figures: dict[str, Figure | None] = {
        "accuracy": _accuracy_figure(runs, logx),
        "metaparams": _metaparams_figure(runs),
        "sensitivity": _sensitivity_figure(runs),
        "sweep": _sweep_figure(runs),
        "cost": _cost_figure(runs),
    }
    return {k: f for k, f in figures.items() if f is not None}
