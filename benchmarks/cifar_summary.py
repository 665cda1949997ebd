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


def _ms(xs: list[float]) -> str:
    return f"{st.mean(xs):.4f} ± {st.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def main(specs: list[str]) -> None:
    print(
        "| row | seeds | final test acc | per seed | best test acc | final λ (mean) | hypergradient steps |"
    )
    print("|---|---:|---:|---|---:|---|---:|")
    for label, rows in map(_rows, specs):
        acc = [float(r["test_accuracy"]) for r in rows]
        best = [float(r["best_test_accuracy"]) for r in rows]
        per_seed = ", ".join(f"{r['seed']}: {a:.4f}" for r, a in zip(rows, acc, strict=True))
        lam = {
            k: st.mean(float(r[f"meta_{k}"]) for r in rows)
            for k in ("beta1", "beta2", "temperature")
        }
        no_meta = all(r["meta_method"] == "baseline" for r in rows)
        lam_s = "—" if no_meta else (
            f"β1 {lam['beta1']:.3f}, β2 {lam['beta2']:.3f}, T {lam['temperature']:.2f}"
        )  # fmt: skip
        steps = st.mean(float(r["hypergradient_steps"]) for r in rows)
        print(
            f"| {label} | {len(rows)} | {_ms(acc)} | {per_seed} | {st.mean(best):.4f} | {lam_s} "
            f"| {steps:.0f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
