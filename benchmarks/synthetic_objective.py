"""Validation objective vs accuracy on the synthetic task: the table of docs/reproduction.md
("What the hypergradient optimizes").

    python benchmarks/synthetic_objective.py EXPERIMENT_DIR [EXPERIMENT_DIR ...]

Reads every ``<method>/seed-*/summary.json`` (+ the last metrics.jsonl row for the final λ) under the
given `metakd experiment` directories and prints, per run, the final λ, test accuracy and test
cross-entropy (the objective the metaparameters are tuned on when ``data.val_is_test: true``); per
method the mean ± sample std of both; and the rank correlation between test cross-entropy and test
accuracy over all runs (negative: lower cross-entropy goes with higher accuracy).
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path


def _runs(root: Path) -> list[dict]:
    out = []
    for summary in sorted(root.glob("*/seed-*/summary.json")):
        s = json.loads(summary.read_text())
        if s.get("status") != "completed":
            continue
        last = None
        for line in (summary.parent / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                last = json.loads(line)
        meta = (last or {}).get("meta") or {}
        out.append(
            {
                "method": summary.parent.parent.name,
                "seed": s["seed"],
                "acc": float(s["test_accuracy"]),
                "ce": float(s["test_loss"]),
                "meta": meta,
            }
        )
    return out


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share the mean rank
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _spearman(a: list[float], b: list[float]) -> float:
    return st.correlation(_ranks(a), _ranks(b))


def _ms(xs: list[float], spec: str) -> str:
    sd = st.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{st.mean(xs):{spec}} ± {sd:{spec}}"


def main(dirs: list[Path]) -> None:
    runs = [r for d in dirs for r in _runs(d)]
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
        rho = _spearman([r["ce"] for r in runs], [r["acc"] for r in runs])
        print(
            f"\nSpearman rank correlation(test cross-entropy, test accuracy) over {len(runs)} runs: {rho:+.2f}"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(a) for a in sys.argv[1:]])
