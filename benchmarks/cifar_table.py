"""Per-method table of CIFAR-10 runs (docs/reproduction.md, "100 epochs on the CPU").

    python benchmarks/cifar_table.py DIR [DIR ...]

One row per (directory, method): final and best test accuracy (mean ± sample std over seeds, and the
per-seed values), final λ (mean), hypergradient steps and wall seconds per epoch (mean). Runs are read
with metakd.reporting.report.load_runs; each DIR is an experiment directory (or a run directory).
"""

from __future__ import annotations

import statistics as st
import sys
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from metakd.reporting.report import Run, load_runs


def mean_std(xs: list[float]) -> str:
    """Mean ± sample std to 4 digits (the mean alone for one value)."""
    return f"{st.mean(xs):.4f} ± {st.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def per_seed(seeds: list[Any], acc: list[float]) -> str:
    """``seed: accuracy`` pairs, comma-separated."""
    return ", ".join(f"{s}: {a:.4f}" for s, a in zip(seeds, acc, strict=True))


def lambda_mean(metas: list[Mapping[str, float]] | None) -> str:
    """Mean final λ over runs; "—" for runs without metaparameters (None)."""
    if metas is None:
        return "—"
    lam = {k: st.mean(float(m[k]) for m in metas) for k in ("beta1", "beta2", "temperature")}
    return f"β1 {lam['beta1']:.3f}, β2 {lam['beta2']:.3f}, T {lam['temperature']:.2f}"


def main(dirs: list[str]) -> None:
    print("| runs | method | seeds | final test acc | per seed | best test acc | final λ (mean) "
          "| hypergradient steps | wall s / epoch |")  # fmt: skip
    print("|---|---|---:|---:|---|---:|---|---:|---:|")
    for d in dirs:
        groups: dict[str, list[Run]] = defaultdict(list)
        for run in load_runs([d]):
            groups[run.method].append(run)
        for method, runs in groups.items():
            sums = [r.summary for r in runs]
            acc = [s["test_accuracy"] for s in sums]
            best = [s["best_test_accuracy"] for s in sums]
            lam_s = lambda_mean(None if method == "baseline" else [s["meta"] for s in sums])
            seeds = per_seed([r.seed for r in runs], acc)
            hg = st.mean(s.get("hypergradient_steps", 0) for s in sums)
            wall = st.mean(s["wall_seconds"] / s["epochs"] for s in sums)
            print(f"| {d} | {method} | {len(runs)} | {mean_std(acc)} | {seeds} | {mean_std(best)} "
                  f"| {lam_s} | {hg:.0f} | {wall:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
