"""Summarise benchmarks/repro_forecasters.sh as the table of docs/forecasting.md.

    python benchmarks/forecast_table.py OUTDIR

Per method/forecaster: final test accuracy (mean ± sample std over seeds), hypergradient and predicted
steps, wall seconds and the seconds spent in hypergradients, and the mean forecast error of the raw λ.
"""

from __future__ import annotations

import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

from metakd.reporting.report import Run, load_runs


def _mean_sd(xs: list[float]) -> str:
    return f"{st.mean(xs):.4f} ± {st.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def main(out: Path) -> None:
    print("| method | forecaster | runs | final test acc | hypergradient steps | predicted steps "
          "| wall s | hypergradient s | forecast error (raw λ, mean) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for exp in sorted(p for p in out.iterdir() if p.is_dir()):
        by_method: dict[str, list[Run]] = defaultdict(list)  # method directory -> its runs
        for run in load_runs([exp]):
            by_method[run.path.parent.name].append(run)
        for name in sorted(by_method):
            sums = [r.summary for r in by_method[name]]
            errs = [
                float(v)
                for r in by_method[name]
                for row in r.rows
                if row.get("forecast_error")
                for v in row["forecast_error"].values()
            ]
            fc = sums[0].get("forecaster") or "—"
            acc = [s["test_accuracy"] for s in sums]
            hg = st.mean(s["hypergradient_steps"] for s in sums)
            pr = st.mean(s["predicted_steps"] for s in sums)
            wall = st.mean(s["wall_seconds"] for s in sums)
            hgs = st.mean(s["phase_seconds"]["hypergrad"] for s in sums)
            err = f"{st.mean(errs):.4f}" if errs else "—"
            print(f"| {name} | {fc} | {len(sums)} | {_mean_sd(acc)} | {hg:.0f} | {pr:.0f} "
                  f"| {wall:.0f} | {hgs:.0f} | {err} |")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
