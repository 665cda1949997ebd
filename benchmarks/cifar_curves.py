"""Test accuracy by epoch and λ by step of CIFAR-10 runs (docs/reproduction.md, "100 epochs on the CPU":
how fast λ walks and when the accuracy gaps open).

    python benchmarks/cifar_curves.py DIR [DIR ...]

Per run (one line each, grouped by DIR and method): test accuracy at epochs 1, 5, 10, 20, ..., 100, then λ —
β1, β2, the hard-label share β1 / (β1 + β2) and T — at the last logged meta step at or before steps 1,000,
2,000, 3,000, 5,000 and the end. Runs are read with metakd.reporting.report.load_runs.
"""

from __future__ import annotations

import sys

import numpy as np

from metakd.reporting.report import Run, load_runs

EPOCHS = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
STEPS = (1001, 2001, 3001, 5001)


def accuracy_by_epoch(run: Run) -> dict[int, float]:
    """Test accuracy per epoch (the last row of an epoch wins, as after a resume)."""
    return {
        int(row["epoch"]): float(row["test_accuracy"])
        for row in run.rows
        if row.get("test_accuracy") is not None and "epoch" in row
    }


def main(dirs: list[str]) -> None:
    for d in dirs:
        for run in sorted(load_runs([d]), key=lambda r: (r.method, str(r.seed))):
            acc = accuracy_by_epoch(run)
            print(f"{d} {run.method} seed {run.seed}: "
                  + " ".join(f"{e}:{acc[e]:.3f}" for e in EPOCHS if e in acc))  # fmt: skip
            steps, b1 = run.series("meta", "beta1")
            if not len(steps):
                continue
            _, b2 = run.series("meta", "beta2")
            _, temp = run.series("meta", "temperature")
            for s in (*STEPS, steps[-1]):
                i = int(np.searchsorted(steps, s, side="right")) - 1
                if i >= 0:
                    share = b1[i] / (b1[i] + b2[i])
                    print(f"    step {steps[i]:.0f}: β1 {b1[i]:.3f} β2 {b2[i]:.3f} "
                          f"share {share:.3f} T {temp[i]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
