"""A user's own data and model, used by the tests as ``data.name=plugins.my_data:digits`` and
``student.name=plugins.my_data:SmallNet``: scikit-learn's digits (1 x 8 x 8 grayscale, 10 classes) as torch
Datasets, and a model that needs the input shape."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

#: the digits example of docs/your-data.md as overrides (tests/test_meta_preset.py, benchmarks/hypergrad_default.py)
DIGITS_EXAMPLE = [
    "data.name=plugins.my_data:digits",
    "data.n_train=500",
    "data.n_val=300",
    "data.n_test=297",
    "student.name=plugins.my_data:SmallNet",
    "teacher.model.name=plugins.my_data:SmallNet",
    "teacher.model.kwargs.hidden=128",
    "teacher.epochs=300",
    "teacher.lr=0.01",
    "train.lr=0.01",
    "train.batch_size=100",
    "wandb.mode=disabled",
]


def digits(n_test: int = 297, val: bool = False) -> dict[str, Dataset]:
    """The 1,797 digits as 1 x 8 x 8 float images (pixel values 0..16): the first ``n_test`` the test set,
    the rest the training pool (with ``val``: its last 300 a validation set of their own)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    labels = torch.tensor(y, dtype=torch.int64)
    out: dict[str, Dataset] = {"test": TensorDataset(images[:n_test], labels[:n_test])}
    if val:
        out["train"] = TensorDataset(images[n_test:-300], labels[n_test:-300])
        out["val"] = TensorDataset(images[-300:], labels[-300:])
    else:
        out["train"] = TensorDataset(images[n_test:], labels[n_test:])
    return out


def not_annotated(**kwargs):  # type: ignore[no-untyped-def]
    return {}


class SmallNet(nn.Module):
    """Flatten -> Linear(prod(input_shape), hidden) -> ReLU -> Linear(num_classes); records its input shapes."""

    shapes: ClassVar[list[tuple[int, ...]]] = []

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        SmallNet.shapes.append(tuple(input_shape))
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
