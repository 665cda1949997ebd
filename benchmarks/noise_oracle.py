"""Issue 32's ceiling: per-sample loss weights that KNOW which labels are flipped (an oracle, not a method).

The per-sample forms of the noise study try to find the flipped examples and turn their label term down.
This script skips the finding: a fixed-λ run (``meta.method=fixed``) whose free per-example entries are set
from the data's own flipped mask — for a clean example β1ᵢ = SHARE, β2ᵢ = 1 − SHARE; for a flipped one
β1ᵢ = 0.001, β2ᵢ = 0.999 (the teacher only) — with one temperature, normalized weights, and everything
else as the study's rows (configs/cifar10.yaml, the same noisy data, teacher and clean validation set).
Its early-stopped test accuracy measures what perfect noise detection buys a per-example (β1ᵢ, β2ᵢ) over
the searcher's best scalar λ in this protocol (a yardstick, not a proof: a learned form may also weight clean
examples unevenly).

With ``--drop`` a flipped example gets β1ᵢ = β2ᵢ = DROPPED (1e-6: no weight on either term, the data
reweighting of Ren et al. 2018 and Meta-Weight-Net at its ideal) and the weights are not normalized (a
clean example's sum is 1 either way): that measures whether the teacher's targets on the flipped examples,
learned from those same noisy labels, are what holds the student back. Row ``oracle-s<SHARE>-T<T>-drop``.

    python benchmarks/noise_oracle.py OUT [--share 0.5] [--temperature 1] [--seed 0] [--rate 0.4] [--drop]
    python benchmarks/noise_table.py OUT --rows grid,oracle-s0.5-T1    # its row: oracle-s<SHARE>-T<T>

OUT is the study's directory (benchmarks/noise_study.sh): its teacher.pt is used and the run goes to
OUT/oracle-s<SHARE>-T<T>/seed-<SEED>. The values reach the run as a whole config file
(OUT/<name>-seed-<SEED>.yaml) with ``meta.values`` lists of N entries (N = 10,112), so the run is an ordinary
``metakd train`` run (resumable, with per_sample.pt).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from metakd.data import load_data
from metakd.runs.config import load_config

FLIPPED_BETA1 = 0.001
DROPPED = 1e-6  # --drop: both weights of a flipped example (the sigmoid's range excludes 0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--share", type=float, default=0.5, help="β1 share of a clean example")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.4)
    ap.add_argument("--kind", default="symmetric")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--drop", action="store_true", help="a flipped example gets no weight at all")
    args = ap.parse_args()

    data = [
        "data.n_val=1000",
        f"data.label_noise.rate={args.rate}",
        f"data.label_noise.kind={args.kind}",
    ]
    name = f"oracle-s{args.share:g}-T{args.temperature:g}" + ("-drop" if args.drop else "")
    run = args.out / name / f"seed-{args.seed}"
    if (run / "config.yaml").is_file():
        cmd = ["metakd", "train", "--resume", str(run), "-q"]
    else:
        overrides = [
            *data, f"teacher.checkpoint={args.out / 'teacher.pt'}", f"seed={args.seed}",
            f"train.epochs={args.epochs}", "device=cpu", "wandb.mode=disabled", "meta.method=fixed",
            "meta.params.beta1.per_sample=true", "meta.params.beta2.per_sample=true",
            f"train.normalize_weights={not args.drop}", f"meta.values.temperature={args.temperature}",
        ]  # fmt: skip
        cfg = load_config("configs/cifar10.yaml", overrides)
        flipped = load_data(cfg.data, cfg.seed, "cpu").flipped["train"]
        beta1 = [FLIPPED_BETA1 if f else args.share for f in flipped.tolist()]
        beta2 = [1.0 - b for b in beta1]
        if args.drop:
            beta1 = [DROPPED if f else b for f, b in zip(flipped.tolist(), beta1, strict=True)]
            beta2 = [DROPPED if f else b for f, b in zip(flipped.tolist(), beta2, strict=True)]
        values = {**cfg.meta.values, "beta1": beta1, "beta2": beta2}
        # the whole config as one file: N-entry meta.values lists do not fit on a command line
        config = args.out / f"{name}-seed-{args.seed}.yaml"
        dumped = cfg.model_dump(mode="json")
        dumped["meta"]["values"] = values
        config.write_text(yaml.safe_dump(dumped))
        print(
            f"{name}: {int(flipped.sum())} of {len(flipped)} labels flipped -> {run}",
            file=sys.stderr,
        )
        cmd = ["metakd", "train", str(config), "--out", str(run), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sys.exit(subprocess.call(cmd, env=env, stdout=subprocess.DEVNULL))


if __name__ == "__main__":
    main()
