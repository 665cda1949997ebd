"""Where the noise of a run's hypergradient comes from: the validation batch or the unrolled train batches
(docs/reproduction.md, "100 epochs on the CPU").

    python benchmarks/hypergrad_noise.py RUN_DIR [--epochs 0,95] [--samples 32] [--val-sizes 128,1024]

For the run's state after each listed epoch (0: the initial state — the seed's student and λ; otherwise the
run's checkpoint of that epoch) it computes the η-step hypergradient dL_val / d raw λ (eq. 11) with
``Trainer.hypergradient`` on ``metakd.runs.run.load_trainer`` — the same computation as the run's meta steps, no meta update — under three
kinds of resampling, ``--samples`` times each:

* val: one train window (the next η real batches), a fresh random validation batch of each size;
* train: the full validation set (10,112 images on CIFAR), the train windows of the next ``--samples``
  meta steps (the batches the run itself would unroll);
* both: window j with a fresh validation batch j of each size — the noise a meta step actually sees.

and prints, per metaparameter, the mean of ``train`` (the hypergradient with the validation noise averaged
out), the standard deviation under each resampling, and mean / std(both): the signal-to-noise ratio a meta
step of that validation-batch size has. For comparison it also prints the mean ± std of the hypergradients
the run itself logged over the same steps (metrics.jsonl): there the weights move between meta steps, here
they are frozen at the checkpoint. Seeded: the same command prints the same numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from metakd.data.batches import derive_seed
from metakd.runs.run import load_trainer
from metakd.runs.rundir import RunDir
from metakd.training.trainer import Trainer


def _grad(trainer: Trainer, steps: range, val: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    assert trainer.meta is not None
    g, finite = trainer.hypergradient(steps.start, train_steps=steps, val_batch=val)
    if not finite:
        raise SystemExit(f"non-finite hypergradient at step {steps.start}")
    return np.array([float(g[n].sum()) for n in trainer.meta.names])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--epochs", default="0,95", help="comma-separated; 0 = the initial state")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--val-sizes", default="128,1024")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(b) for b in args.val_sizes.split(",")]
    rows = RunDir(args.run_dir).read_metrics()
    for epoch in (int(e) for e in args.epochs.split(",")):
        tr = load_trainer(args.run_dir, epoch, device="cpu")
        assert tr.meta is not None
        eta, every, s0 = tr.cfg.meta.unroll, tr.cfg.meta.every, tr.step
        val = tr.splits.val
        gen = torch.Generator().manual_seed(derive_seed(tr.cfg.seed, 99, s0))

        def val_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randperm(int(val.y.shape[0]), generator=gen)[:size]  # noqa: B023
            return val.x[idx], val.y[idx]  # noqa: B023

        windows = [range(s0 + j * every, s0 + j * every + eta) for j in range(args.samples)]
        train = np.stack([_grad(tr, w, (val.x, val.y)) for w in windows])
        res = {"train (full val)": train}
        for b in sizes:
            res[f"val {b}"] = np.stack([_grad(tr, windows[0], val_batch(b)) for _ in windows])
            res[f"both {b}"] = np.stack([_grad(tr, w, val_batch(b)) for w in windows])
        lam = {k: round(float(v.detach()), 3) for k, v in tr.meta.constrained().items()}
        print(f"{args.run_dir} epoch {epoch} (step {s0}, η {eta}, {args.samples} samples), λ {lam}")
        mean = train.mean(0)
        span = range(s0 + 1, s0 + args.samples * every + 1)  # 1-based steps of the logged rows
        logged = [r["hypergrad"] for r in rows if r.get("hypergrad") and r["step"] in span]
        for i, name in enumerate(tr.meta.names):
            cols = " ".join(f"std[{k}] {v[:, i].std(ddof=1):.2e}" for k, v in res.items())
            snr = " ".join(
                f"{b}: {abs(mean[i]) / res[f'both {b}'][:, i].std(ddof=1):.2f}" for b in sizes
            )
            print(f"  {name:12s} mean {mean[i]:+.2e}  {cols}  |mean|/std[both]: {snr}")
            if len(logged) > 1:
                g = np.array([row[name] for row in logged])
                print(f"  {'':12s} logged by the run at steps {span.start}-{span.stop - 1}: "
                      f"mean {g.mean():+.2e} std {g.std(ddof=1):.2e} ({len(g)} meta steps)")  # fmt: skip


if __name__ == "__main__":
    main()
