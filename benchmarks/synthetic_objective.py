"""Validation objective vs accuracy on the synthetic task: the table of docs/reproduction.md
("What the hypergradient optimizes").

    python benchmarks/synthetic_objective.py EXPERIMENT_DIR [EXPERIMENT_DIR ...]

Reads every finished run under the given `metakd experiment` directories (``metakd.reporting.report.load_runs``;
the final λ is that of the last metrics row) and prints, per run, the final λ, test accuracy and test
cross-entropy (the objective the metaparameters are tuned on when ``data.val_is_test: true``); per
method the mean ± sample std of both; and the rank correlation between test cross-entropy and test
accuracy over all runs (negative: lower cross-entropy goes with higher accuracy).
"""

from __future__ import annotations

import statistics as st
import sys
from pathlib import Path

from scipy.stats import spearmanr

from metakd.reporting.report import load_runs


def _runs(dirs: list[Path]) -> list[dict]:
    """Completed runs under ``dirs`` (metakd.reporting.report's reader) as method, seed, accuracy, CE, final λ."""
    out = []
    for run in load_runs(dirs):
        if run.summary.get("status") != "completed":
            continue
        metas = [row["meta"] for row in run.rows if row.get("meta")]
        out.append(
            {
                "method": run.method,
                "seed": run.seed,
                "acc": float(run.summary["test_accuracy"]),
                "ce": float(run.summary["test_loss"]),
                "meta": metas[-1] if metas else {},
            }
        )
    return out


def _ms(xs: list[float], spec: str) -> str:
    sd = st.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{st.mean(xs):{spec}} ± {sd:{spec}}"


def main(dirs: list[Path]) -> None:
    runs = _runs(dirs)
    if not runs:
        sys.exit(f"no completed runs under {', '.join(map(str, dirs))}")
    print("| method | seed | β1 | β2 | T | test accuracy | test cross-entropy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(runs, key=lambda r: (r["method"], r["ce"])):
        m = r["meta"]
        lam = " | ".join(f"{m.get(k, float('nan')):.2f}" for k in ("beta1", "beta2", "temperature"))
        print(f"| {r['method']} | {r['seed']} | {lam} | {r['acc']:.3f} | {r['ce']:.4f} |")
    print("\n| method | runs | test accuracy | test cross-entropy |")
    print("|---|---:|---:|---:|")
    for method in sorted({r["method"] for r in runs}):
        rs = [r for r in runs if r["method"] == method]
        accs, ces = [r["acc"] for r in rs], [r["ce"] for r in rs]
        print(f"| {method} | {len(rs)} | {_ms(accs, '.4f')} | {_ms(ces, '.4f')} |")
    if len(runs) > 2:
        rho = float(spearmanr([r["ce"] for r in runs], [r["acc"] for r in runs]).statistic)
        print(
            f"\nSpearman rank correlation(test cross-entropy, test accuracy) over {len(runs)} runs: {rho:+.2f}"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(a) for a in sys.argv[1:]])
