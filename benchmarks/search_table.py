"""The side-by-side table of search baselines and the metakd pipeline (docs/reproduction.md).

    python benchmarks/search_table.py STUDY_DIR... [--figure PATH]

Each STUDY_DIR holds the ``results.json`` of ``metakd search`` (a grid/random/TPE study with its
retrains, or the ``--sampler hypergrad`` pipeline). Prints one Markdown row per directory: the
budget, the compute in plain runs (wall and CPU seconds over a fixed-λ run's, see metakd.runs.ledger), the
chosen λ, and the test accuracy of that λ retrained on each seed (mean ± sample std). ``--figure``
draws test accuracy against compute (metakd.reporting.search_tables.search_figure).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metakd.reporting.search_tables import finder_text, lambda_text, mean_std, search_figure


def _lam(values: dict) -> str:
    return lambda_text(values, compact=True)


def _pm(m: float | None, s: float | None, d: int = 4) -> str:
    return "–" if m is None else f"{m:.{d}f}" + ("" if s is None else f" ± {s:.{d}f}")


def row(path: Path, r: dict) -> str:
    if r["kind"] == "pipeline":
        runs = r["runs"]
        acc = mean_std([x["test_accuracy"] for x in runs])
        wall = mean_std([x["cost"] for x in runs])
        cpu = mean_std([x["cost_cpu"] for x in runs])
        lam = "; ".join(f"{x['seed']}: {_lam(x['values'])}" for x in runs)
        seeds = ", ".join(f"{x['seed']}: {x['test_accuracy']:.3f}" for x in runs)
        return (f"| `{path.name}`: metakd pipeline ({finder_text(r)} finder, meta "
                f"{r.get('meta_optimizer', '?')}, {r['finder_epochs']} epochs → "
                f"fixed-λ retrain {r['epochs']}) | per seed | {_pm(*wall, 2)} | {_pm(*cpu, 2)} "
                f"| {lam} | – | {_pm(*acc)} | {seeds} |")  # fmt: skip
    c, best, rt = r["cost"], r["best"], r.get("retrain") or []
    acc = mean_std([x["test_accuracy"] for x in rt])
    seeds = ", ".join(f"{x['seed']}: {x['test_accuracy']:.3f}" for x in rt)
    budget = f"{c['trials']} trials" + (f" ({c['pruned']} pruned)" if c["pruned"] else "")
    return (f"| `{path.name}`: {r['sampler']} ({r['space']['mode']} space) | {budget} | {c['plain_runs']:.2f} "
            f"| {c['plain_runs_cpu']:.2f} | {_lam(best['values'])} | {best['val_accuracy']:.4f} "
            f"| {_pm(*acc)} | {seeds} |")  # fmt: skip


def per_class(path: Path, r: dict) -> None:
    """For a pipeline with per-class λ: each entry's mean ± sample std over the seeds found."""
    runs = r["runs"]
    names = [k for k, v in runs[0]["values"].items() if isinstance(v, list)] if runs else []
    for name in names:
        cols = zip(*(x["values"][name] for x in runs), strict=True)
        entries = ", ".join(f"{i}: {_pm(*mean_std(list(c)), 2)}" for i, c in enumerate(cols))
        print(f"\n`{path.name}` {name} per class over seeds {[x['seed'] for x in runs]}: {entries}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--figure", type=Path, default=None)
    args = ap.parse_args()
    results = [json.loads((d / "results.json").read_text()) for d in args.dirs]
    for d, r in zip(args.dirs, results, strict=True):
        r["label"] = d.name  # the figure's legend names each study
    print(
        "| searcher | budget | compute (plain runs, wall) | compute (plain runs, CPU) "
        "| chosen λ | val acc (search seed) | test acc of the chosen λ, retrained | per seed |"
    )
    print("|---|---|---:|---:|---|---:|---:|---|")
    for d, r in zip(args.dirs, results, strict=True):
        print(row(d, r))
    for d, r in zip(args.dirs, results, strict=True):
        if r["kind"] == "pipeline":
            per_class(d, r)
    if args.figure is not None:
        fig = search_figure(results)
        if fig is not None:
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.figure, dpi=100)
            print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
