"""Figures and tables from run directories: the paper's Figs. 2–11 and Table 1, from any set of runs.

Reads only the run-directory files fixed in ``docs/architecture.md`` (``metrics.jsonl``,
``summary.json``, ``config.yaml``), so it works offline on runs from any machine. Runs are grouped by
method (``summary["label"]`` when the experiment runner set one, e.g. ``optimal``, else
``summary["method"]``). Curves of several seeds are aligned by step: each run is linearly
interpolated onto the union of the eval steps inside the step range that every run covers.

Statistics over seeds are the mean and the *sample* standard deviation (``ddof=1``); with one seed
there is no standard deviation (``None``, printed as nothing). :func:`aggregate` is the one place this
is computed; the experiment runner's tables use it too.

Figures use matplotlib's object-oriented :class:`~matplotlib.figure.Figure` API (rendered by Agg,
no pyplot, no global backend switch), so this runs headless.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metakd.runs import search_report
from metakd.runs.rundir import atomic_write_text, read_config_file, read_summary_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "METHOD_ORDER",
    "STAT_KEYS",
    "Run",
    "aggregate",
    "build_report",
    "find_runs",
    "flat_row",
    "load_run",
    "load_runs",
    "make_figures",
    "method_of",
    "results_csv",
    "results_markdown",
]

METHOD_ORDER = ("baseline", "random", "fixed", "hypergrad", "forecast", "optimal")
"""Canonical order of methods in tables and legends; other labels follow alphabetically."""

STAT_KEYS = (
    "test_accuracy",
    "best_test_accuracy",
    "val_accuracy",
    "hypergradient_steps",
    "predicted_steps",
    "wall_seconds",
    "cpu_seconds",
    "plain_runs",
)
"""Scalar ``summary.json`` keys aggregated per method (mean and sample std over seeds)."""

FIGURES = ("accuracy", "metaparams", "sensitivity", "sweep", "cost")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading runs


def method_of(summary: Mapping[str, Any]) -> str:
    """The group a run belongs to: ``summary["label"]`` (set by the experiment runner, e.g.
    ``optimal`` for a fixed-λ retrain) if present, else ``summary["method"]``."""
    return str(summary.get("label") or summary.get("method") or "unknown")


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _scalar(value: Any) -> float | None:
    """A metric as a float; lists (non-scalar metaparameters) become their mean; None stays None."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=float)
    return float(arr.mean()) if arr.size else None


@dataclass
class Run:
    """One finished run directory: its summary, resolved config and metrics rows (in file order)."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def method(self) -> str:
        return method_of(self.summary)

    @property
    def base_method(self) -> str:
        """The trainer's method (``fixed`` for an ``optimal`` retrain)."""
        meta = self.config.get("meta") or {}
        return str(self.summary.get("method") or meta.get("method") or "unknown")

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    def series(self, key: str, sub: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Steps ``(S,)`` and values ``(S,)`` of rows where ``row[key]`` (or ``row[key][sub]``) is
        set, sorted by step; a step logged twice (a resumed run) keeps its last row."""
        by_step: dict[float, float] = {}
        for row in self.rows:
            value = row.get(key)
            if sub is not None:
                value = value.get(sub) if isinstance(value, Mapping) else None
            scalar = _scalar(value)
            if scalar is not None and "step" in row:
                by_step[float(row["step"])] = scalar
        steps = np.array(sorted(by_step), dtype=float)
        return steps, np.array([by_step[s] for s in steps], dtype=float)

    def setting(self, key: str) -> Any:
        """A config value by dotted key (``forecast.window``), falling back to the summary's key."""
        node: Any = self.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node if node is not None else self.summary.get(key.rsplit(".", 1)[-1])


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines()
    rows: list[dict[str, Any]] = []
    fix = "repair or delete that line (or resume the run, which drops unreadable lines)"
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{i} is not UTF-8 text ({exc.reason}); {fix}") from None
        except json.JSONDecodeError as exc:
            if i == len(lines):  # a run killed mid-write leaves a truncated last line
                break
            raise ValueError(f"{path}:{i} is not a JSON metrics row ({exc}); {fix}") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(path: str | Path) -> Run:
    """Read one run directory (``summary.json`` required; ``config.yaml``/``metrics.jsonl`` optional)."""
    path = Path(path)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path} does not exist: {path} is not a finished run directory"
        )
    summary = read_summary_file(summary_path)  # ValueError naming the file and the fix
    config_path = path / "config.yaml"
    config = read_config_file(config_path) if config_path.is_file() else {}
    return Run(path, summary, config, _read_metrics(path / "metrics.jsonl"))


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named by ``paths``: each is a run directory (has ``summary.json``) or a
    directory searched recursively for them. Unfinished runs (no ``summary.json``) are not included."""
    found: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw)
        if (p / "summary.json").is_file():
            found[p.resolve()] = None
        elif p.is_dir():
            hits = sorted(s.parent.resolve() for s in p.rglob("summary.json"))
            if not hits:
                raise FileNotFoundError(
                    f"no finished runs (summary.json) under {p}; pass a run or experiment directory"
                )
            found.update(dict.fromkeys(hits))
        else:
            raise FileNotFoundError(
                f"{p} does not exist or is not a directory; pass a run directory (with summary.json) "
                "or an experiment directory holding run directories"
            )
    return list(found)


def load_runs(
    paths: Iterable[str | Path], *, skipped: list[tuple[Path, str]] | None = None
) -> list[Run]:
    """:func:`load_run` on every run found by :func:`find_runs`, sorted by (method, seed, path).

    With ``skipped`` (a list), an unreadable run (damaged summary.json, config.yaml or metrics.jsonl)
    is left out with a warning naming the file, and appended there as ``(path, reason)``; without
    it, the first unreadable run raises its ``ValueError``."""
    runs = []
    for p in find_runs(paths):
        try:
            runs.append(load_run(p))
        except (ValueError, OSError) as exc:  # ConfigError is a ValueError
            if skipped is None:
                raise
            reason = str(exc) if not isinstance(exc, OSError) else f"{exc.strerror}: {exc.filename}"
            log.warning("skipped the unreadable run %s: %s", p, reason)
            skipped.append((p, reason))
    return sorted(runs, key=lambda r: (_method_key(r.method), str(r.seed), str(r.path)))


# --------------------------------------------------------------------------- aggregation


def _mean_std(values: Sequence[Any]) -> tuple[Any, Any]:
    """Mean and sample std (ddof=1, None for one value) over axis 0; lists stay lists."""
    arr = np.asarray(values, dtype=float)
    mean = arr.mean(axis=0)
    std = arr.std(axis=0, ddof=1) if arr.shape[0] > 1 else None
    return _plain(mean), _plain(std)


def _plain(a: Any) -> Any:
    return None if a is None else (a.tolist() if a.ndim else float(a))


def aggregate(summaries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (see :func:`method_of`), in :data:`METHOD_ORDER`: ``n``, ``seeds``, and
    ``<key>_mean`` / ``<key>_std`` for each of :data:`STAT_KEYS` (mean and sample std, ddof=1, over
    the runs that report the key; std is None with one run), ``best_test_accuracy_max``, and
    ``meta_mean`` / ``meta_std`` ({name: value}) of the final constrained λ."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(method_of(s), []).append(s)
    table: list[dict[str, Any]] = []
    for method in sorted(groups, key=_method_key):
        runs = groups[method]
        row: dict[str, Any] = {
            "method": method,
            "n": len(runs),
            "seeds": [s.get("seed") for s in runs],
        }
        for key in STAT_KEYS:
            values = [float(s[key]) for s in runs if s.get(key) is not None]
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(values) if values else (None, None)
        best = [
            float(s["best_test_accuracy"]) for s in runs if s.get("best_test_accuracy") is not None
        ]
        row["best_test_accuracy_max"] = max(best) if best else None
        names = list(dict.fromkeys(n for s in runs for n in (s.get("meta") or {})))
        row["meta_mean"], row["meta_std"] = {}, {}
        for name in names:
            values = [s["meta"][name] for s in runs if (s.get("meta") or {}).get(name) is not None]
            row["meta_mean"][name], row["meta_std"][name] = _mean_std(values)
        table.append(row)
    return table


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An :func:`aggregate` row flattened for CSV: ``meta_<name>_mean``/``_std`` columns, seeds as
    a space-separated string, lists as JSON."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("meta_mean", "meta_std"):
            stat = key.split("_")[1]
            for name, v in value.items():
                flat[f"meta_{name}_{stat}"] = json.dumps(v) if isinstance(v, list) else v
        elif key == "seeds":
            flat[key] = " ".join(str(s) for s in value)
        else:
            flat[key] = value
    return flat


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return buf.getvalue()


def results_csv(table: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of an :func:`aggregate` table, one row per method."""
    return _csv_text([flat_row(r) for r in table])


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}"


def _pm(mean: Any, std: Any, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return _fmt(mean, digits) + (f" ± {_fmt(std, digits)}" if std is not None else "")


def results_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """Table-1-style Markdown: per method the mean ± sample std over seeds of the final and best
    test accuracy (and the best single run), final validation accuracy, final λ, hypergradient and
    predicted steps, wall time."""
    head = (
        "| method | seeds | final test acc | best test acc (max) | final val acc | final λ (mean) "
        "| hypergrad steps | predicted steps | wall s | cost (plain runs) |\n"
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in table:
        best = _pm(r["best_test_accuracy_mean"], r["best_test_accuracy_std"])
        if r["best_test_accuracy_max"] is not None:
            best += f" ({r['best_test_accuracy_max']:.4f})"
        meta = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in r["meta_mean"].items()) or "–"
        lines.append(
            f"| {r['method']} | {r['n']} | {_pm(r['test_accuracy_mean'], r['test_accuracy_std'])} "
            f"| {best} | {_pm(r['val_accuracy_mean'], r['val_accuracy_std'])} | {meta} "
            f"| {_pm(r['hypergradient_steps_mean'], r['hypergradient_steps_std'], 1)} "
            f"| {_pm(r['predicted_steps_mean'], r['predicted_steps_std'], 1)} "
            f"| {_pm(r['wall_seconds_mean'], r['wall_seconds_std'], 1)} "
            f"| {_pm(r.get('plain_runs_mean'), r.get('plain_runs_std'), 2)} |"
        )
    note = (
        "\nMean ± sample standard deviation (ddof=1) over seeds; no ± with a single seed. "
        "'max' is the best single run's best test accuracy. Cost: wall seconds over a fixed-λ "
        "run's of the same settings and machine (`metakd.runs.ledger`).\n"
    )
    return head + "\n".join(lines) + "\n" + note


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0666 & ~umask like the figures (not mkstemp's 0600)."""
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- figures


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


def _legend(ax: Axes, **kwargs: Any) -> None:
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize="small", **kwargs)
    else:
        ax.legend(handles=[Line2D([], [], linestyle="none", label="no data")], fontsize="small")


def _band(
    ax: Axes, curves: Sequence[tuple[np.ndarray, np.ndarray]], color: Any, label: str
) -> None:
    """Mean line ± sample-std band of aligned curves."""
    steps, values = _align(curves)
    if not steps.size:
        return
    mean = values.mean(axis=0)
    ax.plot(steps, mean, color=color, lw=1.8, label=f"{label} (n={values.shape[0]})")
    if values.shape[0] > 1:
        std = values.std(axis=0, ddof=1)
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

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    groups = _by_method(runs)
    colors = _colors(groups)
    for ax, key, split in zip(
        fig.subplots(1, 2), ("val_accuracy", "test_accuracy"), ("Validation", "Test"), strict=True
    ):
        for method, group in groups.items():
            _band(ax, [r.series(key) for r in group], colors[method], method)
        if logx:
            ax.set_xscale("log")
        ax.set(xlabel="iteration (training step)", ylabel=f"{split.lower()} accuracy")
        ax.set_title(f"{split} accuracy vs iteration (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        _legend(ax, loc="lower right")
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
    fig = Figure(figsize=(5 * len(names), 4.5), layout="constrained")
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
                    label="forecast",
                )
        ax.set(xlabel="iteration (training step)", ylabel=f"{name} (constrained)")
        ax.set_title(f"{name} vs iteration (thin: seeds, bold: mean)")
        ax.grid(alpha=0.3)
        _legend(ax)
    return fig


def _sensitivity_figure(runs: Sequence[Run]) -> Figure | None:
    from matplotlib.figure import Figure

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
            sc = ax.scatter(
                tvals,
                [_scalar(m[beta]) for _, m, _ in pts],
                c=acc,
                cmap="viridis",
                label="runs (colour: accuracy)",
            )
            fig.colorbar(sc, ax=ax, label="final test accuracy")
            _log_x(ax)
            ax.set(xlabel="temperature T (log scale)", ylabel=beta)
            ax.set_title(f"{beta} vs temperature, coloured by test accuracy")
            ax.grid(alpha=0.3)
            _legend(ax)
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
        for v in values:
            label = f"{key}={v}"
            _band(ax, [r.series("test_accuracy") for r in fc if fn(r) == v], colors[label], label)
        pooled = " (other settings pooled)" if len(dims) > 1 else ""
        ax.set(xlabel="iteration (training step)", ylabel="test accuracy")
        ax.set_title(f"Forecast runs: test accuracy by {title}{pooled}")
        ax.grid(alpha=0.3)
        _legend(ax, loc="lower right")
    return fig


def _cost_figure(runs: Sequence[Run]) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    groups = _by_method(runs)
    colors = _colors(groups)
    for ax, key, xlabel in zip(
        fig.subplots(1, 2),
        ("wall_seconds", "hypergradient_steps"),
        ("wall time (s)", "hypergradient steps"),
        strict=True,
    ):
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
                marker="o",
                capsize=3,
                lw=1.5,
                label=f"{method} (n={len(pts)})",
            )
        ax.set(xlabel=xlabel, ylabel="final test accuracy")
        ax.set_title(f"Final test accuracy vs {xlabel} (mean ± std)")
        ax.grid(alpha=0.3)
        _legend(ax)
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


# --------------------------------------------------------------------------- report.md


_SKIPPED = {
    "metaparams": "no run logged metaparameters (`meta` in metrics.jsonl)",
    "sensitivity": "no random or fixed-λ runs",
    "sweep": "the forecast runs do not differ in window size or n",
}
_CAPTIONS = {
    "accuracy": "Validation and test accuracy vs iteration, mean ± std over seeds (paper Figs. 4, 9).",
    "metaparams": "Metaparameter trajectories (constrained λ): seeds thin, mean bold; grey: predicted windows "
    "of one forecast run, dashed: its forecast (raw forecast mapped through the constraint) against "
    "the trajectory that followed (Figs. 5, 10, 11).",
    "sensitivity": "Final test accuracy vs the metaparameters of random/fixed-λ runs (Figs. 6–8).",
    "sweep": "Forecast runs by window size / n = optimize + predict (Figs. 2, 3).",
    "cost": "Final test accuracy vs wall time and hypergradient steps per method (mean ± std).",
}
_SETTINGS = (
    ("config", "name"),
    ("data", "data.name"),
    ("student", "student.name"),
    ("meta_method", "meta.method"),
    ("unroll", "meta.unroll"),
    ("forecaster", "forecast.forecaster"),
    ("window", "forecast.window"),
    ("optimize", "forecast.optimize"),
    ("predict", "forecast.predict"),
    ("epochs", "train.epochs"),
)


def _run_row(run: Run, rel: str) -> dict[str, Any]:
    s = run.summary
    row: dict[str, Any] = {"run": rel, "method": run.method, "seed": run.seed}
    row.update({k: s.get(k) for k in STAT_KEYS})
    for name, value in (s.get("meta") or {}).items():
        row[f"meta_{name}"] = json.dumps(value) if isinstance(value, list) else value
    for k, key in _SETTINGS:
        relevant = not (
            (key.startswith("forecast.") and run.base_method != "forecast")
            or (key == "meta.unroll" and run.base_method not in ("hypergrad", "forecast"))
        )
        row[k] = run.setting(key) if relevant else None
    return row


def _forecast_errors(runs: Sequence[Run]) -> str:
    """Markdown table of mean |forecast_error| per method and metaparameter, or '' when none."""
    errs: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for row in run.rows:
            fe = row.get("forecast_error")
            if isinstance(fe, Mapping):
                for name, v in fe.items():
                    if (x := _scalar(np.abs(np.asarray(v, dtype=float)))) is not None:
                        errs.setdefault(run.method, {}).setdefault(name, []).append(x)
    if not errs:
        return ""
    names = list(dict.fromkeys(n for d in errs.values() for n in d))
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, d in errs.items():
        lines.append(
            f"| {method} | "
            + " | ".join(_fmt(np.mean(d[n]) if n in d else None) for n in names)
            + " |"
        )
    return (
        "## Forecast error\n\nMean |forecast − what followed| (`forecast_error` as logged: raw λ, or "
        "hypergradients with `forecast.target: gradients`) over all comparison windows of all seeds."
        "\n\n" + "\n".join(lines) + "\n\n"
    )


def _command_text(cmd: Any) -> str:
    return shlex.join(str(c) for c in cmd) if isinstance(cmd, list) else str(cmd)


def _command(summary: Mapping[str, Any]) -> str | None:
    cmd = summary.get("command")
    return None if cmd is None else _command_text(cmd)


def _commands_block(run: Run, rel: str) -> str:
    """The commands that made ``run``: the original (with its config and overrides) first, then each
    ``--resume``; without a record, the equivalent command from the run's resolved config."""
    history = [_command_text(c) for c in run.summary.get("commands") or [] if c]
    if not history and (current := _command(run.summary)):
        history = [current]
    if not history:
        return f"# {rel}: no command recorded; its resolved config reproduces it\nmetakd train {shlex.quote(rel + '/config.yaml')}\n"
    lines = [f"# {rel}", history[0]]
    lines += [f"# then: {c}" for c in history[1:]]
    return "\n".join(lines) + "\n"


def _data_of(run: Run) -> str:
    """The data set a run was trained on (``data.name`` of its config)."""
    data = run.config.get("data")
    return str(data.get("name")) if isinstance(data, Mapping) and data.get("name") else "unknown"


def build_report(paths: Sequence[str | Path], out_dir: str | Path, *, logx: bool = False) -> Path:
    """Write ``report.md``, ``results.csv`` (one row per method), ``runs.csv`` (one row per run) and
    the figures (``accuracy.png``, ``metaparams.png``, ``sensitivity.png``, ``sweep.png``,
    ``cost.png``; those without data are skipped and named in ``report.md``) into ``out_dir``.
    ``paths``: run directories and/or directories searched recursively for them; runs whose summary
    has ``status: failed`` are left out (and listed). Returns the path of ``report.md``."""
    skipped: list[tuple[Path, str]] = []
    loaded = load_runs(paths, skipped=skipped)
    runs = [r for r in loaded if r.summary.get("status") != "failed"]
    failed = [r for r in loaded if r.summary.get("status") == "failed"]
    if not runs:
        why = "is unreadable or has status 'failed'" if skipped else "has status 'failed'"
        lines = "".join(f"\n{p}: {reason}" for p, reason in skipped)
        raise ValueError(
            f"every run under {[str(p) for p in paths]} {why}; nothing to report{lines}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_data: dict[str, list[Run]] = {}
    for r in runs:
        by_data.setdefault(_data_of(r), []).append(r)
    if len(by_data) > 1:
        log.warning(
            "the report mixes runs on different data (%s); its results are split by data set",
            ", ".join(f"{d}: {len(rs)} runs" for d, rs in by_data.items()),
        )
    tables = {d: aggregate(r.summary for r in rs) for d, rs in by_data.items()}
    table = next(iter(tables.values())) if len(tables) == 1 else [
        {"data": d, **row} for d, t in tables.items() for row in t
    ]  # fmt: skip
    figures = make_figures(runs, logx=logx)
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=100)
    runs_rows = [_run_row(r, os.path.relpath(r.path, out)) for r in runs]
    _write_text_atomic(out / "results.csv", results_csv(table))
    _write_text_atomic(out / "runs.csv", _csv_text(runs_rows))

    counts = ", ".join(f"{r['method']}: {r['n']}" for r in table)
    parts = [
        "# metakd report\n\n",
        f"{len(runs)} runs ({counts}) from "
        + ", ".join(f"`{p}`" for p in paths)
        + ". Generated by `metakd report` from each run's `metrics.jsonl`, `summary.json`, "
        "`config.yaml`. Tables: [results.csv](results.csv), [runs.csv](runs.csv).\n\n",
        (
            f"Excluded {len(failed)} failed run(s) (summary status 'failed'): "
            + ", ".join(f"`{os.path.relpath(r.path, out)}`" for r in failed)
            + ".\n\n"
            if failed
            else ""
        ),
        (
            f"Skipped {len(skipped)} unreadable run(s):\n\n"
            + "".join(f"- `{os.path.relpath(p, out)}`: {reason}\n" for p, reason in skipped)
            + "\n"
            if skipped
            else ""
        ),
        "## Results\n\n",
    ]
    if len(tables) == 1:
        parts.append(results_markdown(table))
    else:
        parts.append(
            "**Warning: these runs were trained on different data "
            f"({', '.join(f'`{d}`' for d in tables)}); each data set has its own table below, "
            "and the figures overlay them.**\n\n"
        )
        for d, t in tables.items():
            parts.append(f"### Data: {d}\n\n{results_markdown(t)}\n")
    parts.append("\n## Figures\n\n")
    for name in FIGURES:
        if name in figures:
            parts.append(f"### {name}\n\n{_CAPTIONS[name]}\n\n![{name}]({name}.png)\n\n")
        else:
            parts.append(f"### {name}\n\nSkipped: {_SKIPPED[name]}.\n\n")
    parts.append(_forecast_errors(runs))
    parts.append(search_report.section(paths, out))  # studies and pipelines among the paths
    parts.append("## Runs and their settings\n\n")
    cols = ["run", "method", "seed", *(k for k, _ in _SETTINGS), "test_accuracy"]
    parts.append("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
    for row in runs_rows:
        cells = [
            _fmt(row[c]) if isinstance(row[c], float) else ("" if row[c] is None else str(row[c]))
            for c in cols
        ]
        parts.append("| " + " | ".join(cells) + " |\n")
    parts.append("\n## Commands\n\n")
    parts.append(
        "Each run's original command (its config and overrides) first, then each command that "
        "resumed it; a run with no recorded command is reproduced from its resolved `config.yaml` "
        "(paths relative to this report)."
        "\n\n```bash\n"
        + "".join(_commands_block(r, os.path.relpath(r.path, out)) for r in runs)
        + "```\n"
    )
    report = out / "report.md"
    _write_text_atomic(report, "".join(parts))
    return report
