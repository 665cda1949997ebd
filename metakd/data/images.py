"""Image datasets (CIFAR-10, an ImageFolder tree) as a :class:`~metakd.data.pool.Pool`, and augmentation.

Image data follows the paper's CIFAR protocol (the splits: :mod:`metakd.data.pool`): the test split is the
official test set (``cifar10``) or ``data.test_root`` (``imagefolder``), else held out of the training
images; the teacher split is every training image not held out for the test (``n_teacher`` is not used for
image data); per-channel normalisation uses the teacher split's mean/std. Sizes come from the config as
given: the CIFAR config files set the paper's 10,112 / 10,112 / 10,000.

ImageFolder images are decoded once (Pillow: RGB, or one channel when the first image is grayscale) into a
uint8 tensor (N, C, H, W), each through the eval transform when there is one (which may resize images of
any size to one), and cached as ``<cache_dir>/imagefolder-<fingerprint>.pt``; the fingerprint is the SHA-256
of the class names, the Pillow version, the mode and transform (when not plain RGB) and each image's relative
path, label, size in bytes and modification time (ns), so any added, removed or rewritten file invalidates
the cache. Splits, teacher checkpoints and teacher-logit caches are keyed by the SHA-256 of the decoded
pixels and labels instead, so a copy of the same images (extracted again, on another machine) still
matches a teacher trained on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metakd.config import ConfigError, DataConfig
from metakd.data.pool import Pool
from metakd.data.splits import sha256
from metakd.files import atomic_torch_save
from metakd.status import StatusLine

__all__ = [
    "augment_batch",
    "cifar10_images",
    "cifar10_pool",
    "decode_image_folder",
    "imagefolder_pool",
]

log = logging.getLogger(__name__)

_CIFAR_HINT = "data.name=imagefolder data.root=../shared/datasets/cifar10-jpg/train"


#: Pillow modes decoded as one grayscale channel; any other mode is decoded as RGB
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


class _ImageFiles(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(
        self,
        paths: Sequence[str],
        mode: str = "RGB",
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                array = np.array(img.convert(self.mode))  # (H, W, 3) or (H, W) uint8, writable copy
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot decode image {path!r}: {exc}") from None
        x = torch.from_numpy(array)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)  # (C, H, W)
        return (x if self.transform is None else self.transform(x)), path


def _first_mode(path: str) -> str:
    from PIL import Image

    with Image.open(path) as img:
        return "L" if img.mode in GRAY_MODES else "RGB"


def _stack_same_size(batch: list[tuple[Tensor, str]]) -> Tensor:
    first_img, first_path = batch[0]
    for img, path in batch:
        if img.shape != first_img.shape:
            raise ValueError(
                f"image {path!r} has shape {tuple(img.shape)} but {first_path!r} has "
                f"{tuple(first_img.shape)}; all images must have one size: resize them in "
                "data.eval_transform (e.g. [{name: Resize, kwargs: {size: [64, 64]}}])"
            )
    return torch.stack([img for img, _ in batch])


def _folder_samples(
    root: Path, class_to_idx: dict[str, int] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {str(root)!r} does not exist; set data.root (and data.test_root) to folders "
            "in ImageFolder layout root/<class>/<image>, e.g. ../shared/datasets/cifar10-jpg/train"
        )
    classes, found = find_classes(str(root))
    if class_to_idx is None:
        class_to_idx = found
    elif set(classes) - set(class_to_idx):
        raise ValueError(
            f"test folder {str(root)!r} has classes {sorted(set(classes) - set(class_to_idx))} that the "
            f"training folder lacks (training classes: {sorted(class_to_idx)})"
        )
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(
            f"image folder {str(root)!r} holds no images ({', '.join(IMG_EXTENSIONS)})"
        )
    return sorted(class_to_idx, key=class_to_idx.__getitem__), samples


def _folder_fingerprint(
    root: Path, classes: list[str], samples: list[tuple[str, int]], decoding: Any = None
) -> str:
    import PIL

    # the decoder's version is part of the key: JPEG decoders may differ in the last bit
    key: list[Any] = [classes, f"PIL-{PIL.__version__}"]
    if (
        decoding
    ):  # grayscale, an eval transform (RGB without one keeps the keys of earlier versions)
        key.append(decoding)
    h = hashlib.sha256(json.dumps(key).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(
            f"{os.path.relpath(path, root)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()


def decode_image_folder(
    root: str | Path,
    cache_dir: str | Path,
    class_to_idx: dict[str, int] | None = None,
    workers: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    transform_id: Any = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """Decode an ImageFolder-layout folder once, cached under ``cache_dir`` by its file fingerprint.

    Returns {"images": uint8 (N, 3, H, W), "labels": int64 (N,), "classes": [str], "fingerprint": str,
    "content_fingerprint": str} in the sorted order of ``torchvision.datasets.folder.make_dataset``.
    ``fingerprint`` hashes the files' paths, sizes and modification times (cheap: it keys the cache);
    ``content_fingerprint`` hashes the decoded pixels, labels and class names, so the same images copied
    or extracted again (new modification times, another machine) keep it — the splits and the teacher
    compatibility check use it. ``workers`` DataLoader worker processes decode (default
    min(cpu count, 8) for 2,048+ images, else in-process). ``mode``: ``RGB`` or ``L`` (one channel); None
    takes ``L`` when the first image is grayscale, else ``RGB``. ``transform`` (``transform_id``: its
    JSON-able identity, part of the cache key) maps each decoded (C, H, W) uint8 image, e.g. to one size.
    """
    root = Path(root)
    classes, samples = _folder_samples(root, class_to_idx)
    mode = mode or _first_mode(samples[0][0])
    decoding = {k: v for k, v in (("mode", mode), ("transform", transform_id)) if v and v != "RGB"}
    fingerprint = _folder_fingerprint(root, classes, samples, decoding)
    cache = Path(cache_dir) / f"imagefolder-{fingerprint[:24]}.pt"
    if cache.is_file():
        try:
            cached = torch.load(cache, map_location="cpu", weights_only=True)
            if cached.get("fingerprint") == fingerprint:
                if "content_fingerprint" not in cached:  # a cache written before the key existed
                    cached = dict(cached)
                    cached["content_fingerprint"] = _content_fingerprint(cached)
                    atomic_torch_save(cached, cache)
                return dict(cached)
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            warnings.warn(
                f"ignoring unreadable image cache {str(cache)!r} ({exc}); decoding again",
                stacklevel=2,
            )
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(samples) >= 2048 else 0
    loader = torch.utils.data.DataLoader(
        _ImageFiles([p for p, _ in samples], mode, transform),
        batch_size=512,
        num_workers=workers,
        collate_fn=_stack_same_size,
    )
    log.info(
        "decoding %d images under %s (%s); cached in %s for later runs",
        len(samples), root, f"{workers} workers" if workers else "in-process", cache,
    )  # fmt: skip
    status = StatusLine(log, f"decoding images under {root}", len(samples))
    chunks = []
    for chunk in loader:
        chunks.append(chunk)
        status.update(len(chunk))
    shapes = {tuple(c.shape[1:]) for c in chunks}
    if len(shapes) > 1:
        raise ValueError(
            f"images under {str(root)!r} have several sizes {sorted(shapes)}; resize them to one"
        )
    result = {
        "images": torch.cat(chunks),
        "labels": torch.tensor([label for _, label in samples], dtype=torch.int64),
        "classes": classes,
        "fingerprint": fingerprint,
    }
    result["content_fingerprint"] = _content_fingerprint(result)
    atomic_torch_save(result, cache)
    return result


def _content_fingerprint(decoded: dict[str, Any]) -> str:
    return "pixels-" + sha256(decoded["classes"], decoded["labels"], decoded["images"])


def cifar10_images(cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str], str]:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root) if cfg.root is not None else Path(cfg.cache_dir) / "cifar10"
    sets = []
    for train in (True, False):
        try:
            sets.append(CIFAR10(str(root), train=train, download=cfg.download))
        except Exception as exc:
            how = "the download failed" if cfg.download else "data.download is false"
            raise FileNotFoundError(
                f"CIFAR-10 not found under {str(root)!r} and {how} ({exc}). Put the python version "
                f"(cifar-10-batches-py/) there, set data.download=true where there is internet, or use "
                f"the JPEG copy: {_CIFAR_HINT}"
            ) from None
    tensors = []
    for ds in sets:
        tensors.append(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous())  # (N, 3, 32, 32)
        tensors.append(torch.tensor(ds.targets, dtype=torch.int64))
    fingerprint = sha256("cifar10", *tensors)
    return tensors[0], tensors[1], tensors[2], tensors[3], list(sets[0].classes), fingerprint


def cifar10_pool(cfg: DataConfig) -> Pool:
    """CIFAR-10's training images as the pool, its official test set as the test set."""
    images, labels, test_images, test_labels, classes, fingerprint = cifar10_images(cfg)
    return Pool(
        images, labels, classes, fingerprint, test_images, test_labels, test_source="official"
    )


def imagefolder_pool(
    cfg: DataConfig, transform: Callable[[Tensor], Tensor] | None = None, transform_id: Any = None
) -> Pool:
    """``data.root`` (and ``data.test_root``) decoded (:func:`decode_image_folder`), each image through
    ``transform`` (the eval transform) when given."""
    if cfg.root is None:
        raise ConfigError(
            f"data.name=imagefolder needs data.root, a folder in ImageFolder layout, e.g. {_CIFAR_HINT}"
        )
    decode = {"transform": transform, "transform_id": transform_id}
    train = decode_image_folder(cfg.root, cfg.cache_dir, **decode)
    if cfg.test_root is None:
        fp = train["content_fingerprint"]
        return Pool(train["images"], train["labels"], train["classes"], fp)
    class_to_idx = {c: i for i, c in enumerate(train["classes"])}
    mode = "L" if train["images"].shape[1] == 1 else "RGB"
    test = decode_image_folder(cfg.test_root, cfg.cache_dir, class_to_idx, mode=mode, **decode)
    if test["images"].shape[1:] != train["images"].shape[1:]:
        raise ValueError(
            f"test images are {tuple(test['images'].shape[1:])} but training images are "
            f"{tuple(train['images'].shape[1:])}; both folders need one image size (data.eval_transform "
            "can resize them)"
        )
    fp = sha256(train["content_fingerprint"], test["content_fingerprint"])
    return Pool(
        train["images"], train["labels"], train["classes"], fp, test["images"], test["labels"],
        test_source="test_root",
    )  # fmt: skip


def augment_batch(
    x: Tensor,
    generator: torch.Generator | None = None,
    padding: int = 4,
    *,
    rows_of: tuple[int, int] | None = None,
) -> Tensor:
    """Random crop with zero padding ``padding`` and random horizontal flip, per image.

    x: (B, C, H, W) → (B, C, H, W), on x's device. Offsets and flips are drawn from ``generator``
    (on its own device, default the global CPU generator); the input is not modified.
    ``rows_of=(start, total)``: x is rows [start, start + B) of a ``total``-row batch (a rank's shard):
    the draws are the whole batch's, sliced, so each image gets what it would in one process.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch needs images (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    start, total = rows_of if rows_of is not None else (0, b)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    drawn = torch.randint(0, 2 * padding + 1, (2, total), generator=generator, device=gen_device)
    offsets = drawn[:, start : start + b].to(x.device)
    flip = (torch.rand(total, generator=generator, device=gen_device) < 0.5)[start : start + b]
    flip = flip.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
