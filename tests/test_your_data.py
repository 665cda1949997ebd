"""A user's own data and models (issue 30, items 1 and 3): data sources by import path (a factory returning
Datasets, any Dataset class), input shapes from the data reaching user models, ImageFolder images of any
size, and transforms from the config with seeded draws. All of these fail on the code before them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from plugins.my_data import SmallNet
from torch import nn
from torchvision.transforms import v2
from typer.testing import CliRunner

from metakd.config import ConfigError, DataConfig, ModelConfig
from metakd.data import load_data, transforms
from metakd.data.batches import BatchStream, derive_seed
from metakd.data.images import augment_batch
from metakd.data.models import build_model
from metakd.data.targets import LiveTeacher, deterministic_inputs
from metakd.runs.config import load_config
from metakd.runs.run import load_trainer, train_run
from metakd_cli.main import app

DIGITS = "plugins.my_data:digits"


def _digits(tmp_path: Path, **extra: object) -> DataConfig:
    return DataConfig(
        name=DIGITS, n_train=500, n_val=300, n_test=297, cache_dir=str(tmp_path / "c"), **extra
    )


def test_unknown_data_name_is_one_line_naming_the_keys_and_the_import_path_form() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.name=mydata"])
    msg = str(err.value)
    assert "\n" not in msg.strip()
    assert all(k in msg for k in ("synthetic", "cifar10", "imagefolder", "package.module:name"))


def test_digits_from_a_user_factory_keep_one_channel(tmp_path: Path) -> None:
    splits = load_data(_digits(tmp_path), seed=0, device="cpu")
    assert splits.train.x.shape == (500, 1, 8, 8) and splits.num_classes == 10
    assert splits.info["sizes"] == {"teacher": 1500, "train": 500, "val": 300, "test": 297}
    assert splits.info["test_source"] == "given" and splits.info["source"] == DIGITS
    # normalised by the teacher split's mean/std (float data: over all its values)
    assert (
        abs(float(splits.teacher.x.mean())) < 1e-3 and abs(float(splits.teacher.x.std()) - 1) < 1e-2
    )
    assert len(list((tmp_path / "c").glob("dataset-digits-*.pt"))) == 1
    again = load_data(_digits(tmp_path), seed=0, device="cpu")  # from the cache
    assert torch.equal(again.train.x, splits.train.x)
    assert again.info["fingerprint"] == splits.info["fingerprint"]
    # a factory's own validation set: D_val drawn from it, the whole pool left for train/teacher
    own = load_data(_digits(tmp_path, kwargs={"val": True}), seed=0, device="cpu")
    assert own.info["sizes"] == {"teacher": 1200, "train": 500, "val": 300, "test": 297}


def test_user_model_receives_the_input_shape_and_builtins_still_build(tmp_path: Path) -> None:
    splits = load_data(_digits(tmp_path), seed=0, device="cpu")
    shape = tuple(splits.train.x.shape[1:])
    SmallNet.shapes.clear()
    model = build_model(ModelConfig(name="plugins.my_data:SmallNet"), shape, splits.num_classes)
    assert SmallNet.shapes == [(1, 8, 8)] and model(splits.train.x).shape == (500, 10)
    for name in ("logreg", "mlp"):
        assert build_model(ModelConfig(name=name), shape, 10)(splits.train.x).shape == (500, 10)


def test_data_factories_are_checked_before_they_are_called(tmp_path: Path) -> None:
    for path, what in [
        ("os:system", "built-in function"),
        ("plugins.my_data:not_annotated", "function"),
    ]:
        with pytest.raises(ConfigError, match=f"found the {what}.*-> dict"):
            load_data(DataConfig(name=path, cache_dir=str(tmp_path)), 0, "cpu")


def test_digits_end_to_end_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "train", "--out", str(out), "-q", "device=cpu", f"data.name={DIGITS}", "data.n_train=500",
        "data.n_val=300", "data.n_test=297", f"data.cache_dir={tmp_path / 'c'}",
        "student.name=plugins.my_data:SmallNet", "teacher.model.name=plugins.my_data:SmallNet",
        "teacher.model.kwargs.hidden=64", "teacher.epochs=20", "teacher.lr=0.01", "train.lr=0.01",
        "train.epochs=2", "train.batch_size=100", "train.eval_every=0", "train.compile=off",
        "wandb.mode=disabled",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["test_accuracy"] > 0.3


def test_a_torchvision_dataset_class_by_import_path(tmp_path: Path) -> None:
    cfg = DataConfig(
        name="torchvision.datasets:FakeData", n_train=20, n_val=10, n_test=15,
        kwargs={"size": 60, "image_size": [1, 12, 12], "num_classes": 3}, cache_dir=str(tmp_path),
    )  # fmt: skip
    splits = load_data(cfg, seed=0, device="cpu")
    assert splits.train.x.shape == (20, 1, 12, 12) and splits.num_classes == 3
    assert splits.info["test_source"] == "held-out" and splits.info["sizes"]["teacher"] == 45
    # an eval transform applied once per example as it is decoded
    resized = load_data(
        cfg.model_copy(update={"eval_transform": [{"name": "Resize", "kwargs": {"size": [6, 6]}}]}),
        seed=0, device="cpu",
    )  # fmt: skip
    assert resized.train.x.shape == (20, 1, 6, 6)
    assert resized.info["fingerprint"] != splits.info["fingerprint"]


def _two_sizes(root: Path, gray: bool = False) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            size = (40, 30) if i % 2 else (64, 48)  # two image sizes in each class
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(img).convert("L" if gray else "RGB").save(root / name / f"{c}{i}.png")


def test_imagefolder_of_two_image_sizes_resized_by_the_eval_transform(tmp_path: Path) -> None:
    _two_sizes(tmp_path / "imgs")
    cfg = DataConfig(
        name="imagefolder", root=str(tmp_path / "imgs"), n_train=6, n_val=4, n_test=4,
        cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"data\.eval_transform"):
        load_data(cfg, seed=0, device="cpu")
    resize = [{"name": "Resize", "kwargs": {"size": [16, 16]}}]
    splits = load_data(cfg.model_copy(update={"eval_transform": resize}), seed=0, device="cpu")
    assert splits.train.x.shape == (6, 3, 16, 16) and splits.num_classes == 2
    _two_sizes(tmp_path / "gray", gray=True)  # grayscale images stay one channel
    gray = cfg.model_copy(update={"root": str(tmp_path / "gray"), "eval_transform": resize})
    assert load_data(gray, seed=0, device="cpu").train.x.shape == (6, 1, 16, 16)


def test_the_presets_are_the_documented_pipelines() -> None:
    train, ev = transforms.preset("cifar")
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToImage", "ToDtype", "Normalize"]
    crop, norm = train.transforms[0], train.transforms[-1]
    assert crop.size == (32, 32) and crop.padding == [4, 4, 4, 4]
    assert norm.mean == list(transforms.CIFAR_MEAN) and norm.std == list(transforms.CIFAR_STD)
    assert [type(t).__name__ for t in ev.transforms] == ["ToImage", "ToDtype", "Normalize"]
    train, ev = transforms.preset("imagenet")
    assert [type(t).__name__ for t in train.transforms][:2] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
    ]
    assert train.transforms[0].size == (224, 224)
    assert [type(t).__name__ for t in ev.transforms][:2] == ["Resize", "CenterCrop"]
    assert ev.transforms[0].size == [256] and ev.transforms[1].size == (224, 224)
    # on stored batches the conversions are left out: only the random steps run per batch
    steps = transforms.batch_steps("cifar")
    assert isinstance(steps, v2.Compose)
    assert [type(t).__name__ for t in steps.transforms] == ["RandomCrop", "RandomHorizontalFlip"]
    with pytest.raises(ConfigError, match="not a torchvision"):
        transforms.build([{"name": "Nope"}], "train")


def _image_splits(tmp_path: Path, **update: object):  # type: ignore[no-untyped-def]
    cfg = DataConfig(
        name="torchvision.datasets:FakeData", n_train=16, n_val=8, n_test=8,
        kwargs={"size": 40, "image_size": [3, 32, 32], "num_classes": 4}, cache_dir=str(tmp_path),
        **update,
    )  # fmt: skip
    return cfg, load_data(cfg, seed=0, device="cpu")


def test_train_transform_draws_are_seeded_per_step(tmp_path: Path) -> None:
    cfg, splits = _image_splits(tmp_path, train_transform="cifar")
    assert not deterministic_inputs(cfg)  # a random train transform: the live teacher
    live = LiveTeacher(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)))

    def stream() -> BatchStream:
        return BatchStream(splits, live, seed=3, batch_size=8)

    a, b = stream(), stream()
    state = torch.get_rng_state()
    x0, _, t0 = a.batch(0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    assert torch.equal(x0, b.batch(0)[0]) and torch.equal(t0, b.batch(0)[2])
    assert not torch.equal(a.batch(1)[0], b.batch(0)[0])
    assert not torch.equal(x0, splits.train.x[:8]) and x0.shape == (8, 3, 32, 32)
    # data.augment keeps the batched crop + flip of before: the generator of (seed, 2, step)
    _, plain = _image_splits(tmp_path, augment=True)
    aug = BatchStream(plain, live, seed=3, batch_size=8)
    idx = aug._perm(0)[:8]
    want = augment_batch(plain.train.x[idx], torch.Generator().manual_seed(derive_seed(3, 2, 0)))
    assert torch.equal(aug.batch(0)[0], want)


def test_train_transform_run_resumes_exactly(tmp_path: Path) -> None:
    over = [
        "device=cpu", "seed=0", "data.name=torchvision.datasets:FakeData", "data.kwargs.size=40",
        "data.kwargs.image_size=[1,12,12]", "data.kwargs.num_classes=3", "data.n_train=12",
        "data.n_val=6", "data.n_test=9", f"data.cache_dir={tmp_path / 'c'}",
        "data.train_transform=[{name: RandomCrop, kwargs: {size: 12, padding: 2}}, {name: RandomHorizontalFlip}]",
        "student.name=mlp", "teacher.model.name=mlp", "teacher.epochs=3", "train.batch_size=4",
        "train.epochs=2", "train.compile=off", "train.eval_every=0", "train.checkpoint_every=1",
        "meta.unroll=2", "wandb.mode=disabled",
    ]  # fmt: skip
    full = train_run(load_config(None, over), tmp_path / "run")
    resumed = load_trainer(tmp_path / "run", epoch=1)
    assert isinstance(resumed.stream.teacher, LiveTeacher) and resumed.step == 3
    again = resumed.train()
    for key in ("meta", "meta_raw", "test_accuracy", "train_loss", "steps"):
        assert again[key] == full[key], key
