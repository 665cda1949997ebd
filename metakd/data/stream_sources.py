"""The streamable sources' sets for :mod:`metakd.data.streaming`: an ImageFolder tree (``data.name=imagefolder``)
and a :class:`~metakd.data.sources.DatasetSource`'s torch Datasets, each as Datasets of decoded ``(x, y)``
items and their cached scans — or None when ``data.in_memory`` keeps them in memory
(:func:`metakd.data.streaming.streams`, decided from the decoded size of the first item).

The fingerprints: an ImageFolder's is the in-memory path's own (``pixels-`` + the SHA-256 of the class names,
labels and decoded pixels, hashed as they stream past), so its splits, teacher and logit caches are shared
with an in-memory run of the same folder; a Dataset source's is ``data-`` + the SHA-256 of the class names
and each set's input digest and labels (another hash than the in-memory ``data-`` one: its teacher is
trained, or checked, on the streamed data's own fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metakd.config import DataConfig
from metakd.data import transforms
from metakd.data.images import _first_mode, _folder_fingerprint, _folder_samples, _ImageFiles
from metakd.data.materialise import _Items, _probe
from metakd.data.splits import sha256
from metakd.data.streaming import Scan, Streamed, class_json, scan, streams

if TYPE_CHECKING:
    from metakd.data.sources import DatasetSource, Parts

__all__ = ["dataset_sets", "folder_sets"]


class FolderItems(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """(decoded image, label) of an ImageFolder's files (the eval transform applied)."""

    def __init__(self, files: _ImageFiles, labels: list[int]) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.files[i][0], self.labels[i]


def _folder(
    root: Path, transform: Any, tid: Any, class_to_idx: dict[str, int] | None = None,
    mode: str | None = None,
) -> tuple[list[str], str, FolderItems, str]:  # fmt: skip
    classes, samples = _folder_samples(root, class_to_idx)
    mode = mode or _first_mode(samples[0][0])
    decoding = {k: v for k, v in (("mode", mode), ("transform", tid)) if v and v != "RGB"}
    files_fp = _folder_fingerprint(root, classes, samples, decoding)
    items = FolderItems(
        _ImageFiles([p for p, _ in samples], mode, transform), [y for _, y in samples]
    )
    return classes, mode, items, files_fp


def _scan(
    cfg: DataConfig, classes: list[str], items: FolderItems, files_fp: str, name: str
) -> Scan:
    """The folder's scan; its digest hashes (classes, labels, pixels) as the in-memory fingerprint does."""
    labels = torch.tensor(items.labels, dtype=torch.int64)
    prefix = class_json(classes) + b"\x00" + labels.numpy().tobytes() + b"\x00"
    cache = Path(cfg.cache_dir) / f"stream-imagefolder-{files_fp[:24]}.pt"
    return scan(items, name, cache, files_fp, prefix)


def folder_sets(cfg: DataConfig, transform: Any, tid: Any) -> Streamed | None:
    """``data.root`` (and ``data.test_root``) for streaming, or None to load it in memory."""
    if cfg.root is None:
        return None  # imagefolder_pool says what is missing
    classes, mode, train, files_fp = _folder(Path(cfg.root), transform, tid)
    test = None
    if cfg.test_root is not None:
        mapping = {c: i for i, c in enumerate(classes)}
        test = _folder(Path(cfg.test_root), transform, tid, mapping, mode)
    n_items = len(train) + (len(test[2]) if test is not None else 0)
    if not streams(cfg, n_items, torch.as_tensor(train[0][0])):
        return None
    items: dict[str, Any] = {"train": train}
    scans = {"train": _scan(cfg, classes, train, files_fp, "train")}
    fp = "pixels-" + scans["train"].digest
    if test is not None:
        items["test"] = test[2]
        scans["test"] = _scan(cfg, classes, test[2], test[3], "test")
        fp = sha256(fp, "pixels-" + scans["test"].digest)
    return Streamed(items, scans, classes, fp, test_source="test_root",
                    normalized=transforms.normalises(cfg.eval_transform))  # fmt: skip


def dataset_sets(
    source: DatasetSource, parts: Parts, cfg: DataConfig, transform: Any, tid: Any
) -> Streamed | None:
    """A Dataset source's sets for streaming, or None to materialise them in memory."""
    sets = {
        k: v
        for k, v in (("train", parts.train), ("val", parts.val), ("test", parts.test))
        if v is not None
    }
    items = {k: _Items(v, k, transform) for k, v in sets.items()}
    if not streams(cfg, sum(len(v) for v in sets.values()), items["train"][0][0]):
        return None
    key = sha256(
        source.identity(), {k: len(v) for k, v in sets.items()}, tid, *_probe(sets, transform)
    )
    scans = {
        k: scan(v, k, Path(cfg.cache_dir) / f"stream-{source.key}-{key[:24]}-{k}.pt", key)
        for k, v in items.items()
    }
    labels = torch.cat([s.labels for s in scans.values()])
    classes = parts.classes or [str(c) for c in range(int(labels.max()) + 1)]
    if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
        raise ValueError(
            f"data source {source.name}: labels span {int(labels.min())}..{int(labels.max())} but there are "
            f"{len(classes)} classes; labels must be 0..K-1"
        )
    parts_fp = [x for k in sorted(scans) for x in (scans[k].digest, scans[k].labels)]
    fp = "data-" + sha256(classes, *parts_fp)
    return Streamed(items, scans, list(classes), fp,
                    normalized=transforms.normalises(cfg.eval_transform), extra={"source": source.name})  # fmt: skip
