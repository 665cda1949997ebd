"""Datasets: the synthetic generator against the paper's recipe, image folders, augmentation."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import integrate, special, stats

from metakd import data as data_mod
from metakd.config import ConfigError, DataConfig
from metakd.data import augment_batch, decode_image_folder, images, load_data

# --------------------------------------------------------------------------- synthetic


def _published_reference() -> tuple[np.ndarray, np.ndarray]:
    """PAPER.md's recipe, literally: numpy's legacy global generator seeded with 42."""
    state = np.random.get_state()
    try:
        np.random.seed(42)
        x = np.random.randn(430, 2)
        eps = np.random.randn(430)
    finally:
        np.random.set_state(state)
    y = (np.sign(x[:, 0] * x[:, 1] + 0.5 * eps) + 1) // 2
    return x, y


def test_published_dataset_matches_the_reference_recipe() -> None:
    splits = load_data(DataConfig(published=True), seed=123, device="cpu")
    x, y = _published_reference()
    rows = {
        "teacher": slice(0, 200),
        "train": slice(200, 215),
        "val": slice(215, 230),
        "test": slice(230, 430),
    }
    for name, rows_ in rows.items():
        split = getattr(splits, name)
        xs = x[rows_]
        student = np.stack([xs[:, 0], xs[:, 1], xs[:, 0] * xs[:, 1]], 1)
        teacher = np.stack(
            [xs[:, 0], xs[:, 1], (np.sign(xs[:, 0]) + np.sign(xs[:, 1]) > 0).astype(float)], 1
        )
        np.testing.assert_allclose(split.x.numpy(), student, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(split.x_teacher.numpy(), teacher, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(split.y.numpy(), y[rows_].astype(np.int64))
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
    # the well-known first draws of np.random.seed(42)
    np.testing.assert_allclose(
        splits.teacher.x[0, :2].numpy(), [0.4967141530112327, -0.13826430117118466]
    )
    assert splits.num_classes == 2
    assert splits.info["sizes"] == {"teacher": 200, "train": 15, "val": 15, "test": 200}


def test_published_noise_free_ceiling_is_0785() -> None:
    splits = load_data(DataConfig(published=True), seed=0, device="cpu")
    assert splits.info["noise_free_test_accuracy"] == pytest.approx(0.785, abs=1e-12)
    x, y = _published_reference()
    rule = (np.sign(x[230:, 0] * x[230:, 1]) + 1) // 2
    assert np.mean(rule == y[230:]) == pytest.approx(0.785)


def test_published_is_seed_42_and_seeds_give_fresh_datasets() -> None:
    published = load_data(DataConfig(published=True), seed=7, device="cpu")
    seed42 = load_data(DataConfig(), seed=42, device="cpu")
    assert torch.equal(published.test.x, seed42.test.x)
    assert published.info["fingerprint"] == seed42.info["fingerprint"]
    a, b = load_data(DataConfig(), 0, "cpu"), load_data(DataConfig(), 1, "cpu")
    assert not torch.equal(a.train.x, b.train.x)
    assert a.info["fingerprint"] != b.info["fingerprint"]
    again = load_data(DataConfig(), 0, "cpu")
    assert (
        torch.equal(a.train.x, again.train.x) and a.info["fingerprint"] == again.info["fingerprint"]
    )
    fixed = load_data(DataConfig(data_seed=0), 5, "cpu")  # data_seed overrides the run seed
    assert torch.equal(fixed.train.x, a.train.x)


def test_val_is_test_uses_the_test_split_for_validation() -> None:
    splits = load_data(DataConfig(val_is_test=True), seed=0, device="cpu")
    assert splits.val is splits.test
    assert splits.info["fingerprint"] != load_data(DataConfig(), 0, "cpu").info["fingerprint"]


def _agreement_probability(noise: float) -> float:
    """P(sign(x1 x2 + noise eps) = sign(x1 x2)); x1 x2 has density K0(|z|)/pi."""
    flip, _ = integrate.quad(
        lambda z: 2 / math.pi * special.k0(z) * stats.norm.cdf(-z / noise), 0, np.inf, limit=200
    )
    return 1.0 - flip


def test_generator_statistics_match_theory() -> None:
    cfg = DataConfig(n_teacher=10, n_train=10, n_val=10, n_test=40_000, noise=0.5)
    splits = load_data(cfg, seed=3, device="cpu")
    x = splits.test.x.double()
    assert x[:, :2].mean(0).abs().max() < 0.03
    cov = torch.cov(x[:, :2].T)
    assert torch.allclose(cov, torch.eye(2, dtype=torch.float64), atol=0.03)
    assert abs(splits.test.y.double().mean().item() - 0.5) < 0.01  # symmetric labels
    ceiling = splits.info["noise_free_test_accuracy"]
    assert ceiling == pytest.approx(_agreement_probability(0.5), abs=0.008)  # 3.5 sigma
    noiseless = load_data(cfg.model_copy(update={"noise": 0.0}), seed=3, device="cpu")
    assert noiseless.info["noise_free_test_accuracy"] == 1.0


def test_synthetic_sizes_are_configurable() -> None:
    splits = load_data(DataConfig(n_teacher=7, n_train=3, n_val=4, n_test=5), 0, "cpu")
    assert [len(s) for s in (splits.teacher, splits.train, splits.val, splits.test)] == [7, 3, 4, 5]


# --------------------------------------------------------------------------- image folders


def _write_folder(
    root: Path, classes: tuple[str, ...], per_class: int, start: int, size: int = 8
) -> None:
    """PNG images (lossless) whose pixel [0, 0, 0] encodes a global id, so splits can be checked."""
    rng = np.random.default_rng(start)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[0, 0, 0] = start + c * per_class + i
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


def _ids(split: data_mod.Split, info: dict[str, object]) -> set[int]:
    norm = info["normalization"]
    assert isinstance(norm, dict)
    raw = split.x[:, 0, 0, 0] * norm["std"][0] + norm["mean"][0]
    return {round(v) for v in (raw * 255).tolist()}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    _write_folder(root, ("cat", "dog", "emu"), per_class=20, start=0)
    return root


def test_decode_matches_pil_and_caches(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    result = decode_image_folder(folder, cache)
    assert result["images"].shape == (60, 3, 8, 8) and result["images"].dtype == torch.uint8
    assert result["classes"] == ["cat", "dog", "emu"]
    assert result["labels"].tolist() == [0] * 20 + [1] * 20 + [2] * 20
    ref = np.asarray(Image.open(folder / "dog" / "005.png").convert("RGB"))
    np.testing.assert_array_equal(result["images"][25].permute(1, 2, 0).numpy(), ref)
    assert len(list(cache.glob("imagefolder-*.pt"))) == 1

    def no_decode(self: object, i: int) -> None:
        raise AssertionError("a cache hit must not decode")

    monkeypatch.setattr(images._ImageFiles, "__getitem__", no_decode)
    hit = decode_image_folder(folder, cache)
    assert torch.equal(hit["images"], result["images"])
    # a changed file changes the fingerprint: decoding again (here: the patched decoder fires)
    path = folder / "cat" / "000.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="must not decode"):
        decode_image_folder(folder, cache)


def test_a_copy_of_the_same_images_keeps_the_content_fingerprint_and_teacher_split(
    folder: Path, tmp_path: Path
) -> None:
    cfg = DataConfig(
        name="imagefolder", root=str(folder), n_train=12, n_val=10, n_test=15,
        cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    first = decode_image_folder(folder, tmp_path / "c")
    splits = load_data(cfg, seed=0, device="cpu")
    # extracted again elsewhere: new paths and modification times, same pixels
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copy)
    for path in copy.rglob("*.png"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5 * 10**9))
    again = decode_image_folder(copy, tmp_path / "c")
    assert again["fingerprint"] != first["fingerprint"]  # a new cache entry ...
    assert again["content_fingerprint"] == first["content_fingerprint"]  # ... for the same images
    moved = load_data(cfg.model_copy(update={"root": str(copy)}), seed=0, device="cpu")
    assert moved.info["teacher_fingerprint"] == splits.info["teacher_fingerprint"]
    assert moved.info["fingerprint"] == splits.info["fingerprint"]
    # one changed pixel is another dataset
    img = np.asarray(Image.open(copy / "emu" / "003.png").convert("RGB")).copy()
    img[0, 0, 0] ^= 1
    Image.fromarray(img).save(copy / "emu" / "003.png")
    changed = decode_image_folder(copy, tmp_path / "c")
    assert changed["content_fingerprint"] != first["content_fingerprint"]
    # a cache written before content fingerprints existed gets one without decoding again
    (cache_file,) = [p for p in (tmp_path / "c").glob("imagefolder-*.pt")
                     if torch.load(p, weights_only=True)["fingerprint"] == first["fingerprint"]]  # fmt: skip
    old = {k: v for k, v in first.items() if k != "content_fingerprint"}
    torch.save(old, cache_file)
    upgraded = decode_image_folder(folder, tmp_path / "c")
    assert upgraded["content_fingerprint"] == first["content_fingerprint"]
    assert "content_fingerprint" in torch.load(cache_file, weights_only=True)


def test_decode_with_worker_processes(folder: Path, tmp_path: Path) -> None:
    in_process = decode_image_folder(folder, tmp_path / "a", workers=0)
    workers = decode_image_folder(folder, tmp_path / "b", workers=2)
    assert torch.equal(in_process["images"], workers["images"])


def test_imagefolder_splits_hold_out_a_disjoint_test(folder: Path, tmp_path: Path) -> None:
    cfg = DataConfig(
        name="imagefolder",
        root=str(folder),
        n_train=12,
        n_val=10,
        n_test=15,
        cache_dir=str(tmp_path / "c"),
    )
    splits = load_data(cfg, seed=0, device="cpu")
    info = splits.info
    assert info["sizes"] == {"teacher": 45, "train": 12, "val": 10, "test": 15}
    assert info["test_source"] == "held-out" and splits.num_classes == 3
    ids = {k: _ids(getattr(splits, k), info) for k in ("teacher", "train", "val", "test")}
    assert ids["test"].isdisjoint(ids["teacher"])
    assert ids["train"].isdisjoint(ids["val"])
    assert ids["train"] | ids["val"] <= ids["teacher"]
    assert ids["teacher"] | ids["test"] == set(range(60))
    assert splits.train.x_teacher is splits.train.x and splits.train.x.dtype == torch.float32
    # per-channel normalisation with the teacher split's statistics
    mean = splits.teacher.x.mean(dim=(0, 2, 3))
    std = splits.teacher.x.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(
        std, torch.ones(3), atol=1e-4
    )
    # the same data seed gives the same split; another seed another split and fingerprint
    same = load_data(cfg, seed=0, device="cpu")
    assert (
        torch.equal(same.test.y, splits.test.y) and same.info["fingerprint"] == info["fingerprint"]
    )
    other = load_data(cfg, seed=1, device="cpu")
    assert other.info["teacher_fingerprint"] != info["teacher_fingerprint"]
    # n_train does not change the teacher split, so a trained teacher still fits
    smaller = load_data(cfg.model_copy(update={"n_train": 5}), seed=0, device="cpu")
    assert smaller.info["teacher_fingerprint"] == info["teacher_fingerprint"]
    assert smaller.info["fingerprint"] != info["fingerprint"]


def test_imagefolder_with_a_test_folder(folder: Path, tmp_path: Path) -> None:
    test_root = tmp_path / "test"
    _write_folder(test_root, ("cat", "dog", "emu"), per_class=4, start=100)
    cfg = DataConfig(
        name="imagefolder",
        root=str(folder),
        test_root=str(test_root),
        n_train=20,
        n_val=20,
        n_test=12,
        normalize=False,
        cache_dir=str(tmp_path / "c"),
    )
    splits = load_data(cfg, seed=0, device="cpu")
    assert splits.info["test_source"] == "test_root"
    assert len(splits.teacher) == 60
    assert _ids(splits.test, splits.info) == set(range(100, 112))
    assert (
        float(splits.test.x.max()) <= 1.0 and float(splits.test.x.min()) >= 0.0
    )  # no normalisation


def test_image_data_errors(folder: Path, tmp_path: Path) -> None:
    base = {"name": "imagefolder", "cache_dir": str(tmp_path / "c")}
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_data(DataConfig(**base), 0, "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(DataConfig(**base, root=str(tmp_path / "nope")), 0, "cpu")
    with pytest.raises(ConfigError, match="n_train"):
        load_data(DataConfig(**base, root=str(folder), n_train=40, n_val=10, n_test=15), 0, "cpu")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "cat" / "odd.png")
    with pytest.raises(ValueError, match="one size"):
        load_data(DataConfig(**base, root=str(folder), n_train=5, n_val=5, n_test=5), 0, "cpu")


def test_cifar10_missing_files_error_points_to_imagefolder(tmp_path: Path) -> None:
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "none"), download=False)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data\.name=imagefolder"):
        load_data(cfg, 0, "cpu")


# --------------------------------------------------------------------------- augmentation


def test_augment_batch_is_a_padded_crop_with_optional_flip() -> None:
    x = torch.randn(6, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flipped = 0
    for i in range(6):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, dy : dy + 8, dx : dx + 8].flip(-1)
                if flip
                else padded[i, :, dy : dy + 8, dx : dx + 8],
            )
        ]
        assert len(matches) == 1, f"image {i} is not one crop of the padded input"
        flipped += matches[0][2]
    assert 0 < flipped < 6  # seed 0 flips some images, not all
    again = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="B, C, H, W"):
        augment_batch(torch.randn(3, 8), None)
