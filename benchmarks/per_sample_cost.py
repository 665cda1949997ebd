"""Step time of the reverse hypergradient with per-sample free metaparameters against scalar λ (issue 32).

For N = 1k, 10k, 45k training examples (random CIFAR-shaped images, the ``cifar_very_tiny`` student, batch
64, η = 3 reverse look-ahead, SGD with momentum) it times a meta step
(hypergradient + meta update) and a real step, with (β1, β2, T) scalars and with all three per sample
(3N raw entries). Run: ``python benchmarks/per_sample_cost.py [--sizes 1000 10000 45000] [--repeats 3]``;
prints a markdown table (docs/per-sample.md has this CPU's numbers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metakd.data.models import build_model
from metakd.data.splits import Split, Splits
from metakd.runs.config import load_config
from metakd.training.trainer import Trainer

PER_SAMPLE = [f"meta.params.{n}.per_sample=true" for n in ("beta1", "beta2", "temperature")]


def _splits(n: int) -> tuple[Splits, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)

    def split(m: int) -> Split:
        x = torch.randn(m, 3, 32, 32, generator=gen)
        return Split(x=x, y=torch.randint(0, 10, (m,), generator=gen), x_teacher=x)

    s = Splits(teacher=split(8), train=split(n), val=split(500), test=split(8), num_classes=10,
               info={"fingerprint": f"bench-{n}"})  # fmt: skip
    logits = {
        k: torch.randn(len(getattr(s, k)), 10, generator=gen) for k in ("train", "val", "test")
    }
    return s, logits


def _time(trainer: Trainer, repeats: int) -> tuple[float, float]:
    meta, real = [], []
    for i in range(repeats + 1):  # the first is a warm-up
        s = 10 * i
        t0 = time.perf_counter()
        trainer.meta_step(s)
        t1 = time.perf_counter()
        trainer.plain_real_step(trainer.batch(s))
        t2 = time.perf_counter()
        if i:
            meta.append(t1 - t0)
            real.append(t2 - t1)
    return statistics.median(meta), statistics.median(real)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 45_000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = ["meta.method=hypergrad", "meta.unroll=3", "meta.every=10", "train.batch_size=64",
            "train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "meta.val_batch_size=500",
            "student.name=cifar_very_tiny", "device=cpu"]  # fmt: skip
    print(f"threads: {torch.get_num_threads()}")
    print("| N | λ | raw λ entries | meta step (s) | real step (s) |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        splits, logits = _splits(n)
        for label, extra in (("scalar", []), ("per-sample", PER_SAMPLE)):
            cfg = load_config(None, [*base, *extra, f"data.n_train={n}"])
            torch.manual_seed(0)
            model = build_model(cfg.student, (3, 32, 32), 10)
            trainer = Trainer(cfg, model, splits, logits, device="cpu")
            assert trainer.meta is not None
            entries = sum(r.numel() for r in trainer.meta.raw.values())
            meta_s, real_s = _time(trainer, args.repeats)
            print(f"| {n} | {label} | {entries} | {meta_s:.3f} | {real_s:.4f} |", flush=True)


if __name__ == "__main__":
    main()
