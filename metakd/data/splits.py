"""The splits every dataset source returns: teacher / train / val / test tensors, and their fingerprint.

A :class:`Splits` holds the teacher's training data, D_train, D_val and the test set as in-memory
tensors on the training device (x: float32 (N, ...), y: int64 (N,)), the class count and ``info``
(name, sizes and ``fingerprint``, the SHA-256 that identifies the exact data a teacher or a
checkpoint was made on).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "Splits", "sha256", "to_device"]


@dataclass
class Split:
    """One split. x: student inputs (N, ...) float32; y: labels (N,) int64; x_teacher: teacher inputs
    (N, ...) float32 — the same tensor object as x when the teacher sees the student's inputs."""

    x: Tensor
    y: Tensor
    x_teacher: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Splits:
    """teacher: the teacher's training data; train: D_train; val: D_val (the test split itself when
    ``data.val_is_test``); test: held-out data. info: name, sizes, fingerprint (str), and more;
    train_transform: the random transform of train batches (teacher's and student's), None without."""

    teacher: Split
    train: Split
    val: Split
    test: Split
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    #: the random transform of each train batch, ``(x, seed) -> x'`` (:mod:`metakd.data.transforms`; None:
    #: the stored inputs as they are); set by :func:`metakd.data.load_data` from the config
    train_transform: Callable[[Tensor, int], Tensor] | None = None
    #: ``data.label_noise``: which labels were flipped, ``{"teacher": bool (N_teacher,), "train": bool
    #: (N_train,)}`` (empty without noise; :mod:`metakd.data.noise`)
    flipped: dict[str, Tensor] = field(default_factory=dict)


def sha256(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True).encode())
        h.update(b"\x00")
    return h.hexdigest()


def to_device(device: torch.device | str) -> torch.device:
    return torch.device(device)
