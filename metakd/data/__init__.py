"""Datasets as in-memory tensors: the built-ins ``synthetic``, ``cifar10``, ``imagefolder``, and a user's data.

:func:`load_data` returns :class:`Splits` (teacher / train / val / test) whose tensors already live on the
training device, so training never goes through a per-step ``DataLoader``. Each ``data.name`` is one source
object (:mod:`metakd.data.sources`, chosen by :mod:`metakd.data.registry`): the paper's synthetic task
(:mod:`metakd.data.synthetic`), CIFAR-10 and ImageFolder trees (:mod:`metakd.data.images`), a user's function
returning torch Datasets (:mod:`metakd.data.factory`) or a Dataset class such as a torchvision one
(:mod:`metakd.data.dataset_class`), Datasets materialised once into tensors (:mod:`metakd.data.materialise`);
the splitting is :mod:`metakd.data.pool`, the split type :mod:`metakd.data.splits`, the transforms
:mod:`metakd.data.transforms`. This floor also holds the student's batches (:mod:`metakd.data.batches`), the
model registry (:mod:`metakd.data.models`) and teachers with their logit cache (:mod:`metakd.data.teacher`).
"""

from __future__ import annotations

import torch

from metakd.config import DataConfig
from metakd.data import noise, transforms
from metakd.data.images import augment_batch, decode_image_folder
from metakd.data.registry import source_for
from metakd.data.sources import DataSource
from metakd.data.splits import Split, Splits, sha256, to_device
from metakd.data.synthetic import PUBLISHED_SEED, synthetic_arrays

__all__ = [
    "PUBLISHED_SEED",
    "Split",
    "Splits",
    "augment_batch",
    "decode_image_folder",
    "load_data",
    "source_for",
    "synthetic_arrays",
]


def load_data(
    cfg: DataConfig, seed: int, device: torch.device | str, *, source: DataSource | None = None
) -> Splits:
    """Load ``cfg.name`` as :class:`Splits` of float32 inputs / int64 labels on ``device``, with the random
    transform of its train batches (``Splits.train_transform``: ``data.augment`` / ``data.train_transform``).

    ``seed`` is the run seed; ``cfg.data_seed`` overrides it for generation and splitting. For image data
    keep the split seed fixed across a teacher and its students (set ``data.data_seed``): the teacher
    split is every image not held out for the test, so another seed would leak test images into it.
    ``source``: the data itself instead of ``cfg.name``'s (:func:`metakd.data.from_datasets.splits_from_datasets`).
    """
    dev = to_device(device)
    data_seed = seed if cfg.data_seed is None else cfg.data_seed
    splits = (source or source_for(cfg)).splits(cfg, data_seed, dev)
    splits = noise.apply_label_noise(splits, cfg.label_noise, data_seed)  # train labels only
    splits.train_transform = transforms.batch_transform(cfg)
    if cfg.train_transform is not None:  # the inputs a teacher is trained on, and the runs, differ
        described = transforms.describe(cfg.train_transform, "train")
        splits.info["train_transform"] = described
        prefix = splits.info["fingerprint"].rsplit("-", 1)[0]
        splits.info["fingerprint"] = (
            f"{prefix}-" + sha256(splits.info["fingerprint"], described)[:24]
        )
    return splits
