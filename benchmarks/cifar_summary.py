"""The 5-seed summary table of docs/reproduction.md from the committed reports' per-run tables.

    python benchmarks/cifar_summary.py "LABEL=REPORT:METHOD[,REPORT:METHOD ...]" ...

Each argument is one row: the runs of METHOD in each REPORT directory's ``runs.csv`` (written by
``metakd report``), pooled — so a method whose seeds ran in two grids (e.g. baseline seeds 0-1 and 2-4) gets
one row. A seed that appears twice in a row is an error. Prints a Markdown table: seeds, final test accuracy
(mean ± sample std and per seed), best-epoch test accuracy (mean), final λ (mean) and hypergradient steps
(mean). Reads the committed CSVs rather than run directories, so it works on a clean checkout.
"""

from __future__ import annotations

import csv
import statistics as st
import sys
from pathlib import Path

from cifar_table import lambda_mean, mean_std, per_seed  # the sibling script: same cells


def _rows(spec: str) -> tuple[str, list[dict[str, str]]]:
    label, _, sources = spec.rpartition("=")  # labels may hold "=", report paths do not
    if not sources:
        raise SystemExit(f"expected LABEL=REPORT:METHOD[,REPORT:METHOD ...], got {spec!r}")
    rows: list[dict[str, str]] = []
    for src in sources.split(","):
        report, _, method = src.rpartition(":")
        path = Path(report) / "runs.csv"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run `metakd report GRID --out {report}` first")
        with path.open() as f:
            found = [r for r in csv.DictReader(f) if r["method"] == method]
        if not found:
            raise SystemExit(f"no {method!r} runs in {path}")
        rows += found
    seeds = [r["seed"] for r in rows]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"row {label!r}: a seed appears twice ({', '.join(sorted(seeds))})")
    return label, sorted(rows, key=lambda r: int(r["seed"]))


def main(specs: list[str]) -> None:
    print(
        "| row | seeds | final test acc | per seed | best test acc | final λ (mean) | hypergradient steps |"
    )
    print("|---|---:|---:|---|---:|---|---:|")
    for label, rows in map(_rows, specs):
        acc = [float(r["test_accuracy"]) for r in rows]
        best = [float(r["best_test_accuracy"]) for r in rows]
        metas = [
            {k: float(r[f"meta_{k}"]) for k in ("beta1", "beta2", "temperature")} for r in rows
        ]
        no_meta = all(r["meta_method"] == "baseline" for r in rows)
        steps = st.mean(float(r["hypergradient_steps"]) for r in rows)
        print(
            f"| {label} | {len(rows)} | {mean_std(acc)} | {per_seed([r['seed'] for r in rows], acc)} "
            f"| {st.mean(best):.4f} | {lambda_mean(None if no_meta else metas)} "
            f"| {steps:.0f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
