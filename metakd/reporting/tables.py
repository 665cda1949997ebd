"""Tables over seeds: the paper's Table 1 (``results.md``/``results.csv``) from run summaries.

Statistics over seeds are the mean and the *sample* standard deviation (``ddof=1``); with one seed
there is no standard deviation (``None``, printed as nothing). :func:`aggregate` is the one place this
is computed; the experiment runner's tables use it too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from metakd.reporting.loading import _method_key, method_of

log = logging.getLogger(__name__)

__all__ = [
    "STAT_KEYS",
    "aggregate",
    "flat_row",
    "results_csv",
    "results_markdown",
    "runs_text",
]

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
    ``meta_mean`` / ``meta_std`` ({name: value}) of the final constrained λ (None for a λ whose shape
    differs across the method's runs, e.g. meta-weight networks with and without an example weight)."""
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
            shapes = {np.shape(v) for v in values}
            if len(shapes) > 1:  # e.g. two network sizes under one method: no mean of them
                log.warning(
                    "%s: λ %r has shapes %s across its runs; not averaged",
                    method, name, sorted(shapes),
                )  # fmt: skip
                row["meta_mean"][name] = row["meta_std"][name] = None
                continue
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


def runs_text(row: Mapping[str, Any]) -> str:
    """How many runs a table row pools: ``2`` when each run has its own seed, else ``6 runs of 3
    seeds`` (search trials, or runs repeated on one seed, are not independent seeds)."""
    n, seeds = row["n"], row.get("seeds") or []
    distinct = len({json.dumps(s) for s in seeds})
    if len(seeds) != n or distinct == n:
        return str(n)
    return f"{n} runs of {distinct} seed{'s' if distinct != 1 else ''}"


def results_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """Table-1-style Markdown: per method the mean ± sample std over its runs of the final and best
    test accuracy (and the best single run), final validation accuracy, final λ, hypergradient and
    predicted steps, wall time. The runs column says when runs share a seed."""
    head = (
        "| method | runs | final test acc | best test acc (max) | final val acc | final λ (mean) "
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
            f"| {r['method']} | {runs_text(r)} | {_pm(r['test_accuracy_mean'], r['test_accuracy_std'])} "
            f"| {best} | {_pm(r['val_accuracy_mean'], r['val_accuracy_std'])} | {meta} "
            f"| {_pm(r['hypergradient_steps_mean'], r['hypergradient_steps_std'], 1)} "
            f"| {_pm(r['predicted_steps_mean'], r['predicted_steps_std'], 1)} "
            f"| {_pm(r['wall_seconds_mean'], r['wall_seconds_std'], 1)} "
            f"| {_pm(r.get('plain_runs_mean'), r.get('plain_runs_std'), 2)} |"
        )
    shared = any(runs_text(r) != str(r["n"]) for r in table)
    over = (
        "over runs (where runs share a seed, e.g. search trials at different λ, the ± mixes "
        "λ and seeds: it is not a spread over seeds)" if shared else "over runs, one per seed"
    )  # fmt: skip
    note = (
        f"\nMean ± sample standard deviation (ddof=1) {over}; no ± with a single run. "
        "'max' is the best single run's best test accuracy. Cost: wall seconds over a fixed-λ "
        "run's of the same settings and machine (`metakd.runs.ledger`).\n"
    )
    return head + "\n".join(lines) + "\n" + note
