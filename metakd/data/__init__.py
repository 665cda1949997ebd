"""Datasets of the paper's experiments as in-memory tensors: ``synthetic``, ``cifar10``, ``imagefolder``.

:func:`load_data` returns :class:`Splits` (teacher / train / val / test) whose tensors already live on the
training device, so training never goes through a per-step ``DataLoader``. The sources:
:mod:`metakd.data.synthetic` (the paper's synthetic task) and :mod:`metakd.data.images` (CIFAR-10 and
ImageFolder trees, decoded once and cached); the split type is :mod:`metakd.data.splits`. This floor
also holds the student's batches (:mod:`metakd.data.batches`), the model registry
(:mod:`metakd.data.models`) and teachers with their logit cache (:mod:`metakd.data.teacher`).
"""

from __future__ import annotations

import torch

from metakd.config import ConfigError, DataConfig
from metakd.data.images import (
    augment_batch,
    cifar10_images,
    decode_image_folder,
    image_splits,
    imagefolder_images,
)
from metakd.data.splits import Split, Splits, to_device
from metakd.data.synthetic import PUBLISHED_SEED, synthetic_arrays, synthetic_splits

__all__ = [
    "PUBLISHED_SEED",
    "Split",
    "Splits",
    "augment_batch",
    "decode_image_folder",
    "load_data",
    "synthetic_arrays",
]


def load_data(cfg: DataConfig, seed: int, device: torch.device | str) -> Splits:
    """Load ``cfg.name`` as :class:`Splits` of float32 inputs / int64 labels on ``device``.

    ``seed`` is the run seed; ``cfg.data_seed`` overrides it for generation and splitting. For image data
    keep the split seed fixed across a teacher and its students (set ``data.data_seed``): the teacher
    split is every image not held out for the test, so another seed would leak test images into it.
    """
    dev = to_device(device)
    data_seed = seed if cfg.data_seed is None else cfg.data_seed
    if cfg.name == "synthetic":
        return synthetic_splits(cfg, data_seed, dev)
    if cfg.name == "cifar10":
        if cfg.test_root is not None:
            raise ConfigError(
                "data.test_root is only read by data.name=imagefolder; cifar10 uses its official test set"
            )
        return image_splits(cfg, data_seed, dev, cifar10_images(cfg))
    if cfg.name == "imagefolder":
        return image_splits(cfg, data_seed, dev, imagefolder_images(cfg))
    raise ConfigError(f"unknown data.name {cfg.name!r}; use synthetic, cifar10 or imagefolder")
