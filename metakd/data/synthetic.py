"""The paper's synthetic task as :class:`~metakd.data.splits.Splits`.

Synthetic task (PAPER.md): x ~ N(0, I₂), ε ~ N(0, 1), y = (sign(x₁x₂ + noise·ε) + 1) // 2 ∈ {0, 1}
(sign 0 gives label 0, as in the reference). The teacher sees [x₁, x₂, 1[sign x₁ + sign x₂ > 0]], the
student [x₁, x₂, x₁x₂]. Rows are drawn at once from ``numpy.random.RandomState(seed)`` — first
``randn(N, 2)`` for x, then ``randn(N)`` for ε, N = n_teacher + n_train + n_val + n_test — and split in
that order. ``published: true`` uses seed 42, which is exactly the published dataset (the reference called
the same legacy generator through ``np.random.seed(42)``); any other seed is a fresh dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metakd.config import DataConfig
from metakd.data.splits import Split, Splits, sha256

__all__ = ["PUBLISHED_SEED", "synthetic_arrays", "synthetic_splits"]

PUBLISHED_SEED = 42
"""numpy legacy seed of the published synthetic dataset."""


def synthetic_arrays(n: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's draw: ``RandomState(seed)``, x = randn(n, 2), then ε = randn(n).

    Returns x (n, 2) float64 and y (n,) int64 with y = (sign(x₁x₂ + noise·ε) + 1) // 2.
    """
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 2)
    eps = rng.randn(n)
    y = ((np.sign(x[:, 0] * x[:, 1] + noise * eps) + 1) // 2).astype(np.int64)
    return x, y


def synthetic_splits(cfg: DataConfig, seed: int, device: torch.device) -> Splits:
    sizes = {"teacher": cfg.n_teacher, "train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    data_seed = PUBLISHED_SEED if cfg.published else seed
    x, y = synthetic_arrays(sum(sizes.values()), data_seed, cfg.noise)
    x1, x2 = x[:, 0], x[:, 1]
    student = np.stack([x1, x2, x1 * x2], axis=1)  # (N, 3)
    teacher = np.stack([x1, x2, (np.sign(x1) + np.sign(x2) > 0).astype(np.float64)], axis=1)
    splits: dict[str, Split] = {}
    start = 0
    for name, size in sizes.items():
        rows = slice(start, start + size)
        start += size
        splits[name] = Split(
            x=torch.as_tensor(student[rows], dtype=torch.float32, device=device),
            y=torch.as_tensor(y[rows], device=device),
            x_teacher=torch.as_tensor(teacher[rows], dtype=torch.float32, device=device),
        )
    test = slice(start - cfg.n_test, start)
    rule = ((np.sign(x1[test] * x2[test]) + 1) // 2).astype(np.int64)  # noise-free rule
    info: dict[str, Any] = {
        "name": "synthetic",
        "published": cfg.published,
        "data_seed": data_seed,
        "generator": "numpy.random.RandomState",
        "noise": cfg.noise,
        "sizes": sizes,
        "val_is_test": cfg.val_is_test,
        "noise_free_test_accuracy": float(np.mean(rule == y[test])),
    }
    content = {k: info[k] for k in ("generator", "data_seed", "noise", "sizes", "val_is_test")}
    info["fingerprint"] = "synthetic-" + sha256(content, x, y)[:24]
    info["teacher_fingerprint"] = (
        "synthetic-" + sha256(data_seed, cfg.noise, x[: cfg.n_teacher])[:24]
    )
    return Splits(
        teacher=splits["teacher"],
        train=splits["train"],
        val=splits["test"] if cfg.val_is_test else splits["val"],
        test=splits["test"],
        num_classes=2,
        info=info,
    )
