"""Per-method table of CIFAR-10 runs (docs/reproduction.md, "100 epochs on the CPU").

    python benchmarks/cifar_table.py DIR [DIR ...]

One row per (directory, method): final and best test accuracy (mean ± sample std over seeds, and the
per-seed values), final λ (mean), hypergradient steps and wall seconds per epoch (mean). Runs are read
with metakd.report.load_runs; each DIR is an experiment directory (or a run directory).
"""

from __future__ import annotations

import statistics as st
import sys
from collections import defaultdict

from metakd.report import Run, load_runs


def _ms(xs: list[float]) -> str:
    return f"{st.mean(xs):.4f} ± {st.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


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
            lam = {
                k: st.mean(s["meta"][k] for s in sums) for k in ("beta1", "beta2", "temperature")
            }
            lam_s = "—" if method == "baseline" else (
                f"β1 {lam['beta1']:.3f}, β2 {lam['beta2']:.3f}, T {lam['temperature']:.2f}"
            )  # fmt: skip
            seeds = ", ".join(f"{r.seed}: {a:.4f}" for r, a in zip(runs, acc, strict=True))
            hg = st.mean(s.get("hypergradient_steps", 0) for s in sums)
            wall = st.mean(s["wall_seconds"] / s["epochs"] for s in sums)
            print(f"| {d} | {method} | {len(runs)} | {_ms(acc)} | {seeds} | {_ms(best)} | {lam_s} "
                  f"| {hg:.0f} | {wall:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
