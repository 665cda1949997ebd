"""Tables and the figure of search studies and the metakd pipeline (what ``metakd report`` adds).

A study's results (``results.json``, kind ``search``) list every trial with its λ, final validation
accuracy (the score), the test accuracy of its own run (shown, never used to choose), its seconds and
its cost in plain runs: cost_i = wall_i / (w̄ · S), where w̄ is the mean wall seconds per step of the
study's complete trials (each a fixed-λ run: the study measures its own plain run) and S their step
count, so a pruned trial costs the share of a run it used. ``best_so_far`` follows the trials in
order: the validation-best λ so far and its run's test accuracy, against the cumulative cost.

A pipeline's results (kind ``pipeline``, :mod:`metakd.runs.pipeline`) list per seed the finder run and the
fixed-λ retrain; its cost is (finder + retrain seconds) / retrain seconds.

The figure (``search.png``): test accuracy against compute in plain runs — per searcher the
best-so-far curve on the search seed and its retrained λ's mean ± std over the retrain seeds at the
search's total cost; the pipeline's seeds as points and their mean ± std.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "LEGEND_FONTSIZE",
    "find_results",
    "finder_text",
    "lambda_text",
    "mean_std",
    "results_markdown",
    "search_figure",
    "section",
]


LEGEND_FONTSIZE = 9.0
"""Points of the search figure's legend (saved at 100 dpi: smaller is hard to read)."""


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; None with fewer than two values)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _f(v: Any, d: int = 4) -> str:
    return "–" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


def finder_text(results: Mapping[str, Any]) -> str:
    """A pipeline's finder: ``hypergrad (reverse, η = 20, 3 metaparameters)``: the hypergradient
    method, its unroll η (look-ahead methods) and the number of metaparameter entries, when its config
    is recorded."""
    meta = (results.get("config") or {}).get("meta") or {}
    method = (meta.get("hypergrad") or {}).get("method")
    entries = sum(math.prod(p.get("shape") or [1]) for p in (meta.get("params") or {}).values())
    unroll = meta.get("unroll") if method in ("reverse", "forward") else None
    parts = (
        method,
        f"η = {unroll}" if unroll else "",
        f"{entries} metaparameters" if entries else "",
    )
    detail = ", ".join(x for x in parts if x)
    return f"{results.get('finder_method')}" + (f" ({detail})" if detail else "")


def lambda_text(values: Mapping[str, Any] | None, compact: bool = False) -> str:
    """``β1 0.1, β2 0.9, T 4``; a per-class λ as ``T [v1, v2, ...]``, or with ``compact`` as its
    range ``T 3.9–4.1 (10 classes)``."""
    short = {"beta1": "β1", "beta2": "β2", "temperature": "T"}

    def num(v: Any) -> str:
        if not isinstance(v, list):
            return f"{v:.3g}"
        if compact:
            return f"{min(v):.3g}–{max(v):.3g} ({len(v)} classes)"
        return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"

    return ", ".join(f"{short.get(k, k)} {num(v)}" for k, v in (values or {}).items()) or "–"


def results_markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables of a search or pipeline result."""
    if results.get("kind") == "pipeline":
        lines = [
            f"## metakd pipeline ({finder_text(results)} finder, meta "
            f"{results.get('meta_optimizer', '?')}, {results.get('finder_epochs')} epochs, then a "
            f"fixed-λ retrain of {results.get('epochs')})\n",
            "| seed | found λ | finder val acc | retrain test acc | finder cost | total cost "
            "(plain runs, wall) | total cost (CPU) |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["runs"]:
            lines.append(
                f"| {r['seed']} | {lambda_text(r['values'])} | {_f(r['finder'].get('val_accuracy'))} "
                f"| {_f(r['test_accuracy'])} | {_f(r['finder_cost'], 2)} | {_f(r['cost'], 2)} "
                f"| {_f(r['cost_cpu'], 2)} |"
            )
        s = results.get("summary") or {}
        lines.append(
            f"\nMean ± sample std over seeds: test accuracy {_pm(s.get('test_accuracy_mean'), s.get('test_accuracy_std'))}, "
            f"cost {_pm(s.get('cost_mean'), s.get('cost_std'), 2)} plain runs.\n"
        )
        return "\n".join(lines) + "\n"
    c = results["cost"]
    best = results.get("best") or {}
    lines = [
        f"## Search `{results['study_name']}`: {results['sampler']} ({results['space']['mode']} "
        f"space, pruner {results['pruner']})\n",
        f"{c['trials']} trials ({c['pruned']} pruned), cost {c['plain_runs']:.2f} plain runs "
        f"(wall; CPU {c['plain_runs_cpu']:.2f}; pruning saved {c['pruning_saved']:.2f}). Best trial "
        f"{best.get('number', '–')}: {lambda_text(best.get('values'))}, val accuracy "
        f"{_f(best.get('val_accuracy'))}.\n",
        *([f"**Warning: {results['missing']['text']}.**\n"] if results.get("missing") else []),
        "| trial | state | λ | val acc (score) | test acc (not used) | steps | wall s | cost "
        "(plain runs) | cumulative | best trial so far |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["trials"]:
        lines.append(
            f"| {r['number']} | {r['state'].lower()} | {lambda_text(r['values'])} | {_f(r['val_accuracy'])} "
            f"| {_f(r['test_accuracy'])} | {_f(r['steps'])} | {_f(r['wall_seconds'], 1)} "
            f"| {_f(r['cost'], 2)} | {_f(r['cum_cost'], 2)} | {_f(r['best_so_far'])} |"
        )
    rs = results.get("retrain_summary")
    if rs:
        lines += ["", f"Retrained at trial {best.get('number')}'s λ:", "",
                  "| seed | test acc | cost (plain runs) |", "|---:|---:|---:|"]  # fmt: skip
        for r in results.get("retrain") or []:
            note = (" (the trial's own run)" if r.get("reused_trial") else
                    " (imported)" if r.get("imported_from") else "")  # fmt: skip
            lines.append(
                f"| {r['seed']}{note} | {_f(r['test_accuracy'])} | {_f(r.get('cost'), 2)} |"
            )
        lines.append(
            f"\nMean ± sample std: {_pm(rs['test_accuracy_mean'], rs['test_accuracy_std'])}."
        )
    return "\n".join(lines) + "\n"


def _pm(mean: Any, std: Any, d: int = 4) -> str:
    return "–" if mean is None else _f(mean, d) + ("" if std is None else f" ± {_f(std, d)}")


def find_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The search and pipeline results (``results.json`` of kind search/pipeline) under ``paths``."""
    found: dict[Path, dict[str, Any]] = {}
    for p in paths:
        for f in sorted(Path(p).rglob("results.json")):
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict) and data.get("kind") in ("search", "pipeline"):
                found[f.resolve()] = data
    return list(found.values())


def search_figure(results: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Test accuracy against compute (plain runs): searchers' best-so-far curves and retrained λ,
    the pipeline's seeds and mean; None without any result. A result's optional ``"label"`` (e.g. its
    study directory's name) starts its legend entries."""
    from matplotlib.figure import Figure

    if not results:
        return None
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.add_subplot()
    for i, r in enumerate(results):
        color = f"C{i}"
        name = r.get("label")
        if r["kind"] == "search":
            name = name or r["sampler"]
            pts = [(t["cum_cost"], t["best_so_far_test"]) for t in r["trials"]
                   if t["best_so_far_test"] is not None]  # fmt: skip
            if pts:
                xs, ys = zip(*pts, strict=True)
                label = f"{name} (best so far by val, search seed)"
                ax.step(xs, ys, where="post", color=color, marker=".", label=label)
            rs = r.get("retrain_summary")
            if rs and rs.get("test_accuracy_mean") is not None:
                ax.errorbar([r["cost"]["plain_runs"]], [rs["test_accuracy_mean"]],
                            yerr=[rs.get("test_accuracy_std") or 0.0], color=color, marker="s",
                            capsize=4, linestyle="none",
                            label=f"{name}: chosen λ retrained, seeds {rs['seeds']}")  # fmt: skip
        else:
            runs = [x for x in r["runs"] if x.get("cost") is not None]
            tag = f"{name + ': ' if name else ''}metakd pipeline ({finder_text(r)}, meta {r.get('meta_optimizer', '?')})"
            ax.scatter([x["cost"] for x in runs], [x["test_accuracy"] for x in runs], color=color,
                       marker="x", label=f"{tag}, per seed")  # fmt: skip
            s = r.get("summary") or {}
            if s.get("cost_mean") is not None:
                ax.errorbar([s["cost_mean"]], [s["test_accuracy_mean"]],
                            xerr=[s.get("cost_std") or 0.0], yerr=[s.get("test_accuracy_std") or 0.0],
                            color=color, marker="*", markersize=12, capsize=4, linestyle="none",
                            label=f"{tag}, mean ± std")  # fmt: skip
    ax.set_xlabel("compute (plain fixed-λ runs, wall)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy vs compute: " + " and ".join(
        dict.fromkeys("search studies" if r["kind"] == "search" else "the metakd pipeline"
                      for r in results)))  # fmt: skip
    ax.grid(alpha=0.3)
    # below the axes, at the report's reading size (labels are long: one or two columns)
    labels = ax.get_legend_handles_labels()[1]
    ncols = 1 if max(map(len, labels), default=0) > 50 else 2
    fig.legend(loc="outside lower center", ncols=ncols, fontsize=LEGEND_FONTSIZE)
    return fig


def section(paths: Sequence[str | Path], out: Path) -> str:
    """The report.md section of the searches and pipelines under ``paths`` (and ``search.png``),
    or '' when there are none."""
    results = find_results(paths)
    if not results:
        return ""
    parts = ["## Search studies and the metakd pipeline\n\n"]
    fig = search_figure(results)
    if fig is not None:
        fig.savefig(out / "search.png", dpi=100)
        parts.append("Test accuracy against compute in plain runs (see `metakd.reporting.search_tables`)."
                     "\n\n![search](search.png)\n\n")  # fmt: skip
    for r in results:
        parts.append("#" + results_markdown(r) + "\n")
    return "".join(parts)
