"""Summarise the synthetic reproduction (benchmarks/repro_synthetic.sh) as the table of docs/reproduction.md.

    python benchmarks/synthetic_table.py OUTDIR

For each protocol directory under OUTDIR (published, fresh, fresh-valtest) it prints, per method, the mean ±
sample std of the final test accuracy over seeds, and the noise-free rule's accuracy sign(x1·x2) on the same
test sets (the ceiling), recomputed from the same generator and seeds.
"""

from __future__ import annotations

import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

import torch

from metakd.data import load_data
from metakd.reporting.report import Run, load_runs
from metakd.runs.config import load_config


def ceiling(config_yaml: Path) -> float:
    cfg = load_config(config_yaml)
    splits = load_data(cfg.data, cfg.seed, torch.device("cpu"))
    return float(splits.info["noise_free_test_accuracy"])


def main(out: Path) -> None:
    for proto in ("published", "fresh", "fresh-valtest"):
        root = out / proto
        if not root.is_dir():
            continue
        by_method: dict[str, list[Run]] = defaultdict(list)  # method directory -> its runs
        for run in load_runs([root]):
            by_method[run.path.parent.name].append(run)
        ceilings: dict[int, float] = {}
        for run in (r for name in sorted(by_method) for r in by_method[name]):
            if run.seed not in ceilings:
                ceilings[run.seed] = ceiling(run.path / "config.yaml")
        print(f"\n### {proto}\n")
        print("| method | runs | final test accuracy | max |")
        print("|---|---:|---:|---:|")
        for name in sorted(by_method):
            accs = [r.summary["test_accuracy"] for r in by_method[name]]
            sd = st.stdev(accs) if len(accs) > 1 else float("nan")
            print(f"| {name} | {len(accs)} | {st.mean(accs):.4f} ± {sd:.4f} | {max(accs):.3f} |")
        if ceilings:
            vals = list(ceilings.values())
            print(
                f"| noise-free rule sign(x1·x2) (ceiling) | {len(vals)} datasets | "
                f"{st.mean(vals):.4f} ± {(st.stdev(vals) if len(vals) > 1 else 0.0):.4f} | {max(vals):.3f} |"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
