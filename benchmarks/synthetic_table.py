"""Summarise the synthetic reproduction (benchmarks/repro_synthetic.sh) as the table of docs/reproduction.md.

    python benchmarks/synthetic_table.py OUTDIR

For each protocol directory under OUTDIR (published, fresh, fresh-valtest) it prints, per method, the mean ±
sample std of the final test accuracy over seeds, and the noise-free rule's accuracy sign(x1·x2) on the same
test sets (the ceiling), recomputed from the same generator and seeds.
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

import torch

from metakd.config import load_config
from metakd.data import load_data


def ceiling(config_yaml: Path) -> float:
    cfg = load_config(config_yaml)
    splits = load_data(cfg.data, cfg.seed, torch.device("cpu"))
    return float(splits.info["noise_free_test_accuracy"])


def main(out: Path) -> None:
    for proto in ("published", "fresh", "fresh-valtest"):
        root = out / proto
        if not root.is_dir():
            continue
        rows = []
        ceilings: dict[int, float] = {}
        for mdir in sorted(p for p in root.iterdir() if p.is_dir()):
            accs, seeds = [], []
            for run in sorted(mdir.glob("seed-*")):
                summary = run / "summary.json"
                if not summary.is_file():
                    continue
                s = json.loads(summary.read_text())
                accs.append(s["test_accuracy"])
                seeds.append(s["seed"])
                if s["seed"] not in ceilings:
                    ceilings[s["seed"]] = ceiling(run / "config.yaml")
            if accs:
                sd = st.stdev(accs) if len(accs) > 1 else float("nan")
                rows.append((mdir.name, len(accs), st.mean(accs), sd, max(accs)))
        print(f"\n### {proto}\n")
        print("| method | runs | final test accuracy | max |")
        print("|---|---:|---:|---:|")
        for name, n, mean, sd, mx in rows:
            print(f"| {name} | {n} | {mean:.4f} ± {sd:.4f} | {mx:.3f} |")
        if ceilings:
            vals = list(ceilings.values())
            print(
                f"| noise-free rule sign(x1·x2) (ceiling) | {len(vals)} datasets | "
                f"{st.mean(vals):.4f} ± {(st.stdev(vals) if len(vals) > 1 else 0.0):.4f} | {max(vals):.3f} |"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
