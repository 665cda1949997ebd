"""From a source's in-memory examples (a :class:`Pool`) to the run's :class:`~metakd.data.splits.Splits`.

The paper's CIFAR protocol, for any source of examples: a seeded permutation of the training pool gives the
student's train split (``n_train``) and the validation split (the next ``n_val``), or, when the source gives
its own validation set, ``n_val`` seeded-subsampled examples of it. The test split is the source's test set
(CIFAR-10's official one, ``data.test_root``, a factory's ``test``) seeded-subsampled to ``n_test``; without
one the first ``n_test`` examples of the permutation are held out, disjoint from the rest. The teacher split is
every training example not held out for the test. Per-channel normalisation (``data.normalize``) uses the
mean/std of the teacher split — exact, from histograms, for uint8 images (scaled to [0, 1] first); over all
values of a channel (dim 1; a feature of (N, d) data) for float examples — unless the examples were normalised
by the eval transform already (``Pool.normalized``). Fingerprints hash the examples, labels and split
indices, never where the files lie.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metakd.config import ConfigError, DataConfig
from metakd.data.splits import Split, Splits, sha256

__all__ = ["Pool", "channel_stats", "histogram_stats", "pool_splits"]


@dataclass
class Pool:
    """A source's examples in memory: ``x`` uint8 images (N, C, H, W) or float (N, ...), ``y`` int64 (N,);
    the optional test and validation sets alike; class names; the content fingerprint of all of it."""

    x: Tensor
    y: Tensor
    classes: list[str]
    fingerprint: str
    test_x: Tensor | None = None
    test_y: Tensor | None = None
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    test_source: str = "given"
    normalized: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _uint8_stats(images: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean and std (in [0, 1] pixel units) of uint8 images[idx], from histograms."""
    channels = images.shape[1]
    hist = torch.zeros(channels, 256, dtype=torch.float64)
    for chunk in idx.split(4096):
        values = images[chunk].transpose(0, 1).reshape(channels, -1).long()  # (C, n·H·W)
        offsets = torch.arange(channels)[:, None] * 256
        hist += torch.bincount((values + offsets).flatten(), minlength=channels * 256).view(
            channels, 256
        )
    return histogram_stats(hist)


def histogram_stats(hist: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, std) in [0, 1] pixel units of a (C, 256) float64 histogram of uint8 values
    (exact counts, so the in-memory and the streamed scan give the same float32 result)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(1)
    mean = (hist * levels).sum(1) / count
    var = (hist * (levels - mean[:, None]) ** 2).sum(1) / count
    return mean.float(), var.clamp_min(1e-12).sqrt().float()


def channel_stats(x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of x[idx] (uint8 images in [0, 1] units; float data as it is)."""
    if x.dtype == torch.uint8:
        return _uint8_stats(x, idx)
    rows = x[idx].double()
    rows = rows.reshape(len(idx), 1) if rows.dim() == 1 else rows
    per_channel = rows.transpose(0, 1).reshape(rows.shape[1], -1)
    mean = per_channel.mean(1)
    std = per_channel.std(1, unbiased=False).clamp_min(1e-6)
    return mean.float(), std.float()


def _check_sizes(cfg: DataConfig, pool: Pool) -> None:
    n_pool = pool.x.shape[0]
    n_test = None if pool.test_x is None else pool.test_x.shape[0]
    if n_test is None and cfg.n_test >= n_pool:
        raise ConfigError(
            f"data.n_test={cfg.n_test} held-out test images leave none of the {n_pool} training images; "
            "lower data.n_test or give a test folder (data.test_root)"
        )
    if n_test is not None and cfg.n_test > n_test:
        raise ConfigError(
            f"data.n_test={cfg.n_test} exceeds the {n_test} images of the test set; lower it"
        )
    left = n_pool - (cfg.n_test if n_test is None else 0)
    if pool.val_x is not None:
        if cfg.n_val > pool.val_x.shape[0]:
            raise ConfigError(
                f"data.n_val={cfg.n_val} exceeds the {pool.val_x.shape[0]} examples of the given "
                "validation set; lower it"
            )
        if cfg.n_train > left:
            raise ConfigError(
                f"data.n_train={cfg.n_train} exceeds the {left} training examples; lower it"
            )
    elif cfg.n_train + cfg.n_val > left:
        raise ConfigError(
            f"data.n_train={cfg.n_train} + data.n_val={cfg.n_val} exceeds the {left} training images "
            "left after the test split; lower them"
        )


def pool_splits(
    cfg: DataConfig, seed: int, device: torch.device, pool: Pool, key: str | None = None
) -> Splits:
    """The :class:`Splits` of ``pool`` under ``cfg``'s sizes and ``seed``; ``key`` (default ``cfg.name``)
    prefixes the fingerprints."""
    key = key or cfg.name
    images, labels = pool.x, pool.y
    n_pool = images.shape[0]
    _check_sizes(cfg, pool)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pool, generator=gen)
    if pool.test_x is None or pool.test_y is None:
        test_idx, rest = perm[: cfg.n_test], perm[cfg.n_test :]
        test_src, test_lbl = images, labels
    else:
        test_idx = torch.randperm(pool.test_x.shape[0], generator=gen)[: cfg.n_test]
        rest = perm
        test_src, test_lbl = pool.test_x, pool.test_y
    train_idx = rest[: cfg.n_train]
    if pool.val_x is None or pool.val_y is None:
        val_src, val_lbl = images, labels
        val_idx = rest[cfg.n_train : cfg.n_train + cfg.n_val]
    else:
        val_src, val_lbl = pool.val_x, pool.val_y
        val_idx = torch.randperm(pool.val_x.shape[0], generator=gen)[: cfg.n_val]
    channels = 1 if images.dim() == 1 else images.shape[1]
    if cfg.normalize and not pool.normalized:
        mean, std = channel_stats(images, rest)
    else:
        mean, std = torch.zeros(channels), torch.ones(channels)
    view = (1, -1, *([1] * max(images.dim() - 2, 0))) if images.dim() > 1 else (-1,)
    mean_d, std_d = mean.to(device).view(view), std.to(device).view(view)

    def make(src: Tensor, lbl: Tensor, idx: Tensor) -> Split:
        x = src[idx].to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = x.sub_(mean_d).div_(std_d)  # (n, C, ...)
        return Split(x=x, y=lbl[idx].to(device), x_teacher=x)

    splits = {
        "teacher": make(images, labels, rest),
        "train": make(images, labels, train_idx),
        "val": make(val_src, val_lbl, val_idx),
        "test": make(test_src, test_lbl, test_idx),
    }
    test_source = "held-out" if pool.test_x is None else pool.test_source
    norm = {"mean": mean.tolist(), "std": std.tolist()}
    teacher_fp = sha256(
        pool.fingerprint, rest.sort().values, test_source, test_idx.sort().values, norm
    )
    info: dict[str, Any] = {
        "name": cfg.name,
        "root": cfg.root,
        "test_root": cfg.test_root,
        "classes": pool.classes,
        "data_seed": seed,
        "sizes": {k: len(v) for k, v in splits.items()},
        "test_source": test_source,
        "val_is_test": cfg.val_is_test,
        "normalization": norm,
        "source_fingerprint": pool.fingerprint,
        "teacher_fingerprint": f"{key}-{teacher_fp[:24]}",
        **pool.extra,
    }
    # where the images lie is not part of their identity (source_fingerprint is): a moved copy matches
    identity = {k: v for k, v in info.items() if k not in ("root", "test_root")}
    info["fingerprint"] = f"{key}-" + sha256(identity, train_idx, val_idx)[:24]
    # rows of the teacher split that are the train split (metakd.data.noise flips them alike)
    info["teacher_rows"] = {"train": [0, int(train_idx.numel())]}
    return Splits(
        teacher=splits["teacher"],
        train=splits["train"],
        val=splits["test"] if cfg.val_is_test else splits["val"],
        test=splits["test"],
        num_classes=len(pool.classes),
        info=info,
    )
