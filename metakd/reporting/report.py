"""The report (``metakd report``): ``report.md`` with the paper's Table 1 and Figs. 2–11, from any set of runs.

:func:`build_report` assembles the report from its parts: runs are read by
:mod:`metakd.reporting.loading`, the tables over seeds come from :mod:`metakd.reporting.tables`, the
figures from :mod:`metakd.reporting.figures`, and the search studies and pipelines among the paths
from :mod:`metakd.reporting.search_tables`. The names those modules own are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metakd.files import atomic_write_text
from metakd.reporting import per_sample, search_tables
from metakd.reporting.figures import FIGURES, make_figures
from metakd.reporting.loading import (
    METHOD_ORDER,
    Run,
    _scalar,
    find_runs,
    load_run,
    load_runs,
    method_of,
)
from metakd.reporting.tables import (
    STAT_KEYS,
    _csv_text,
    _fmt,
    aggregate,
    flat_row,
    results_csv,
    results_markdown,
    runs_text,
)

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

log = logging.getLogger(__name__)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0666 & ~umask like the figures (not mkstemp's 0600)."""
    atomic_write_text(path, text)


_SKIPPED = {
    "metaparams": "no run logged metaparameters (`meta` in metrics.jsonl)",
    "sensitivity": "no random or fixed-λ runs",
    "sweep": "the forecast runs do not differ in window size or n",
}
_CAPTIONS = {
    "accuracy": "Validation and test accuracy vs iteration, mean ± std over each method's runs; a "
    "method evaluated once per run is one point with a ± std bar (paper Figs. 4, 9).",
    "metaparams": "Metaparameter trajectories (constrained λ): runs thin, mean bold (runs of constant λ "
    "thin only); grey: predicted windows of one forecast run, dashed: its forecast (raw forecast mapped through the constraint) against "
    "the trajectory that followed (Figs. 5, 10, 11).",
    "sensitivity": "Final test accuracy vs the metaparameters of random/fixed-λ runs (Figs. 6–8).",
    "sweep": "Forecast runs by window size / n = optimize + predict (Figs. 2, 3).",
    "cost": "Final test accuracy vs wall time and (where any run took one) hypergradient steps per "
    "method (mean ± std).",
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
    ``cost.png``; those without data are skipped and named in ``report.md``; ``per_sample.png`` and
    its AUROC table only when a run has a ``per_sample.pt`` with flipped and clean examples) into
    ``out_dir``.
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
    noisy = [e for r in runs if (e := per_sample.load_per_sample(r)) is not None]
    if ps_fig := per_sample.per_sample_figure(
        noisy, [os.path.relpath(e.run.path, out) for e in noisy]
    ):
        ps_fig.savefig(out / "per_sample.png", dpi=100)
    runs_rows = [_run_row(r, os.path.relpath(r.path, out)) for r in runs]
    _write_text_atomic(out / "results.csv", results_csv(table))
    _write_text_atomic(out / "runs.csv", _csv_text(runs_rows))

    counts = ", ".join(f"{r['method']}: {runs_text(r)}" for r in table)
    parts = [
        "# metakd report\n\n",
        f"{len(runs)} run{'s' if len(runs) != 1 else ''} ({counts}) from "
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
    parts.append(per_sample.section(noisy, out))  # runs with per_sample.pt (issue 32)
    parts.append(_forecast_errors(runs))
    parts.append(search_tables.section(paths, out))  # studies and pipelines among the paths
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
