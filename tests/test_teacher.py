"""Teachers: training against an independent solver, checkpoints, and the teacher-logit cache."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from metakd.config import Config, ConfigError, DataConfig
from metakd.data import Split, Splits, load_data
from metakd.data import teacher as teacher_mod
from metakd.data.teacher import load_teacher, save_teacher, teacher_logits, train_teacher


def _config(tmp_path: Path, **teacher: Any) -> Config:
    cfg = Config()
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.teacher.epochs = teacher.pop("epochs", 200)
    cfg.teacher.lr = teacher.pop("lr", 0.05)
    for key, value in teacher.items():
        setattr(cfg.teacher, key, value)
    return cfg


def test_synthetic_teacher_matches_sklearn_logistic_regression(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=300, lr=0.1)
    splits = load_data(DataConfig(published=True), 0, "cpu")
    rows: list[tuple[int, dict[str, Any]]] = []
    state = torch.get_rng_state()
    model, metrics = train_teacher(cfg, splits, "cpu", progress=lambda e, r: rows.append((e, r)))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert len(rows) == 300 and rows[-1][0] == 299 and "test_accuracy" in rows[-1][1]
    assert metrics["steps"] == 300 and metrics["input_shape"] == [3] and metrics["num_classes"] == 2
    # two-class softmax regression = logistic regression on the logit difference (unregularised)
    x_fit, y_fit = splits.teacher.x_teacher.numpy(), splits.teacher.y.numpy()
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(x_fit, y_fit)
    assert isinstance(model, nn.Linear)
    weight, bias = model.weight.detach(), model.bias.detach()
    np.testing.assert_allclose((weight[1] - weight[0]).numpy(), ref.coef_[0], atol=5e-3)
    np.testing.assert_allclose(float(bias[1] - bias[0]), ref.intercept_[0], atol=5e-3)
    assert metrics["test_accuracy"] == pytest.approx(
        ref.score(splits.test.x_teacher.numpy(), splits.test.y.numpy())
    )
    assert metrics["teacher_accuracy"] == pytest.approx(ref.score(x_fit, y_fit))


def test_training_is_seeded(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=3, batch_size=64)
    splits = load_data(DataConfig(), 0, "cpu")
    first, _ = train_teacher(cfg, splits, "cpu")
    again, _ = train_teacher(cfg, splits, "cpu")
    cfg.seed = 1
    other, _ = train_teacher(cfg, splits, "cpu")
    for a, b, c in zip(
        first.state_dict().values(),
        again.state_dict().values(),
        other.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b) and not torch.equal(a, c)


def _image_splits(n: int = 24, classes: int = 3) -> Splits:
    gen = torch.Generator().manual_seed(0)

    def split(m: int) -> Split:
        x = torch.randn(m, 3, 32, 32, generator=gen)
        return Split(x=x, y=torch.randint(0, classes, (m,), generator=gen), x_teacher=x)

    return Splits(split(n), split(8), split(8), split(8), classes, {"fingerprint": "images-test"})


def _assert_metrics_are_the_models(
    model: nn.Module, metrics: dict[str, Any], splits: Splits
) -> None:
    """The reported accuracies and losses are those of the returned model's own logits (eval mode,
    recomputed here: counts of argmax == y over 24 / 8 examples, so the counts are exact; the
    cross-entropy to float32 round-off of a mean of 8-24 terms, 8ε)."""
    with torch.no_grad():
        for split, key in ((splits.teacher, "teacher"), (splits.test, "test")):
            logits = model(split.x_teacher).float()
            hits = int((logits.argmax(1) == split.y).sum())
            assert round(metrics[f"{key}_accuracy"] * len(split.y)) == hits, key  # the same count
            loss = float(torch.nn.functional.cross_entropy(logits.double(), split.y))
            assert metrics[f"{key}_loss"] == pytest.approx(loss, rel=8 * 1.2e-7), key


def test_minibatch_training_with_augmentation(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=2, lr=1e-3, batch_size=10)
    cfg.teacher.model.name = "cifar_very_tiny"
    cfg.data.augment = True
    model, metrics = train_teacher(cfg, _image_splits(), "cpu")
    assert metrics["steps"] == 2 * 3  # ceil(24 / 10) batches per epoch
    assert not model.training
    _assert_metrics_are_the_models(model, metrics, _image_splits())


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_lr_schedule_follows_torch_scheduler(tmp_path: Path, schedule: str) -> None:
    cfg = _config(tmp_path, epochs=2, lr=0.1, batch_size=10, optimizer="sgd", momentum=0.9)
    cfg.teacher.model.name = "cifar_very_tiny"
    cfg.teacher.lr_schedule = schedule
    _, metrics = train_teacher(cfg, _image_splits(), "cpu")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    lr = torch.optim.lr_scheduler
    steps = metrics["steps"]  # 2 epochs x 3 batches, stepped per batch
    if schedule != "constant":
        sched = (
            lr.CosineAnnealingLR(opt, T_max=steps)
            if schedule == "cosine"
            else lr.OneCycleLR(opt, max_lr=0.1, total_steps=steps, cycle_momentum=False)
        )
        for _ in range(steps):
            opt.step()
            sched.step()
    assert metrics["final_lr"] == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
    assert (metrics["final_lr"] == 0.1) == (schedule == "constant")


def test_bf16_channels_last_training(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=1, lr=1e-3, batch_size=10, bf16=True, channels_last=True)
    cfg.teacher.model.name = "cifar_very_tiny"
    cfg.data.augment = True
    model, metrics = train_teacher(cfg, _image_splits(), "cpu")
    assert np.isfinite(metrics["final_train_loss"])
    _assert_metrics_are_the_models(model, metrics, _image_splits())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    path = save_teacher(tmp_path / "t.pt", model, cfg, metrics)
    loaded, _ = load_teacher(path, "cpu")
    x = _image_splits().test.x_teacher
    torch.testing.assert_close(loaded(x), model(x))


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=2, batch_size=8)
    cfg.teacher.model.name = "cifar_very_tiny"
    splits = _image_splits()
    model, metrics = train_teacher(cfg, splits, "cpu")
    path = save_teacher(tmp_path / "t.pt", model, cfg, metrics)
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["model"] == {"name": "cifar_very_tiny", "kwargs": {}} and raw["input_shape"] == [
        3,
        32,
        32,
    ]
    loaded, info = load_teacher(path, "cpu")
    assert not loaded.training and info["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert (
        info["num_classes"] == 3 and info["config"]["teacher"]["model"]["name"] == "cifar_very_tiny"
    )
    with torch.no_grad():
        assert torch.equal(loaded(splits.test.x), model.eval()(splits.test.x))
    with pytest.raises(ValueError, match="input shape"):
        save_teacher(tmp_path / "u.pt", model, cfg, {"test_accuracy": 0.5})


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metakd teacher CONFIG"):
        load_teacher(tmp_path / "missing.pt", "cpu")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt"):
        load_teacher(corrupt, "cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a metakd teacher checkpoint"):
        load_teacher(foreign, "cpu")


class _Calls:
    def __init__(self, fn: Any) -> None:
        self.fn, self.n = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.n += 1
        return self.fn(*args, **kwargs)


def _forbid(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a cache hit must not build or run the teacher")


def test_in_process_teacher_logits_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, epochs=50)
    splits = load_data(cfg.data, 0, "cpu")
    trainer = _Calls(train_teacher)
    monkeypatch.setattr(teacher_mod, "train_teacher", trainer)
    logits = teacher_logits(cfg, splits, "cpu")
    assert trainer.n == 1 and len(list(Path(cfg.data.cache_dir).glob("teacher-logits-*.pt"))) == 1
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        "train": (15, 2),
        "val": (15, 2),
        "test": (200, 2),
    }
    assert all(v.dtype == torch.float32 for v in logits.values())
    model, _ = train_teacher(cfg, splits, "cpu")  # deterministic: the same teacher
    with torch.no_grad():
        assert torch.allclose(logits["test"], model(splits.test.x_teacher))
    # hit: nothing is built or run
    monkeypatch.setattr(teacher_mod, "train_teacher", _forbid)
    monkeypatch.setattr(teacher_mod, "build_model", _forbid)
    hit = teacher_logits(cfg, splits, "cpu")
    assert all(torch.equal(hit[k], logits[k]) for k in logits)
    # another dataset or teacher config misses
    monkeypatch.undo()
    monkeypatch.setattr(teacher_mod, "train_teacher", trainer)
    teacher_logits(cfg, load_data(cfg.data, 1, "cpu"), "cpu")
    assert trainer.n == 2
    cfg.teacher.lr = 0.01
    teacher_logits(cfg, splits, "cpu")
    assert trainer.n == 3


def test_in_process_teacher_reports_progress_and_cache_hits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path, epochs=40)
    splits = load_data(cfg.data, 0, "cpu")
    rows: list[int] = []
    asked: list[int] = []

    @contextlib.contextmanager
    def progress(epochs: int) -> Iterator[Callable[[int, dict[str, Any]], None]]:
        asked.append(epochs)
        yield lambda epoch, row: rows.append(epoch)

    with caplog.at_level(logging.INFO, logger="metakd.data.teacher"):
        first = teacher_logits(cfg, splits, "cpu", progress=progress)
    assert asked == [40] and rows == list(range(40))
    fingerprint = splits.info["fingerprint"][:12]
    assert "training the in-process teacher logreg (40 epochs, seed 0" in caplog.text
    assert f"on data {fingerprint}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metakd.data.teacher"):
        hit = teacher_logits(cfg, splits, "cpu", progress=progress)
    assert asked == [40]  # a hit trains nothing and shows no bar
    assert "teacher logits: cached" in caplog.text and "not recomputed" in caplog.text
    assert all(torch.equal(hit[k], first[k]) for k in first)


def test_checkpoint_teacher_logits_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, epochs=30)
    splits = load_data(cfg.data, 0, "cpu")
    model, metrics = train_teacher(cfg, splits, "cpu")
    ckpt = save_teacher(tmp_path / "teacher.pt", model, cfg, metrics)
    student = _config(tmp_path, checkpoint=str(ckpt))
    loader = _Calls(load_teacher)
    monkeypatch.setattr(teacher_mod, "load_teacher", loader)
    monkeypatch.setattr(teacher_mod, "train_teacher", _forbid)
    logits = teacher_logits(student, splits, "cpu")
    with torch.no_grad():
        assert torch.allclose(logits["train"], model(splits.train.x_teacher))
    assert loader.n == 1
    monkeypatch.setattr(teacher_mod, "load_teacher", _forbid)
    monkeypatch.setattr(teacher_mod, "build_model", _forbid)
    teacher_logits(student, splits, "cpu")  # hit
    # a rewritten checkpoint (other weights) invalidates the cache
    monkeypatch.undo()
    monkeypatch.setattr(teacher_mod, "load_teacher", loader)
    with torch.no_grad():
        model.weight.add_(1.0)
    save_teacher(ckpt, model, cfg, metrics)
    changed = teacher_logits(student, splits, "cpu")
    assert loader.n == 2 and not torch.allclose(changed["train"], logits["train"])
    # a changed data fingerprint misses too (same teacher split, other student split)
    resplit = load_data(cfg.data.model_copy(update={"n_train": 10}), 0, "cpu")
    teacher_logits(student, resplit, "cpu")
    assert loader.n == 3


def test_checkpoint_trained_on_other_data_is_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=5)
    splits = load_data(cfg.data, 0, "cpu")
    model, metrics = train_teacher(cfg, splits, "cpu")
    ckpt = save_teacher(tmp_path / "teacher.pt", model, cfg, metrics)
    student = _config(tmp_path, checkpoint=str(ckpt))
    with pytest.raises(ConfigError, match="another teacher/test split"):
        teacher_logits(student, load_data(cfg.data, 1, "cpu"), "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        teacher_logits(_config(tmp_path, checkpoint=str(tmp_path / "none.pt")), splits, "cpu")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="corrupt"):
        teacher_logits(_config(tmp_path, checkpoint=str(tmp_path / "bad.pt")), splits, "cpu")


def test_damaged_logit_cache_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path, epochs=5)
    splits = load_data(cfg.data, 0, "cpu")
    first = teacher_logits(cfg, splits, "cpu")
    (cache,) = Path(cfg.data.cache_dir).glob("teacher-logits-*.pt")
    cache.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="unreadable"):
        again = teacher_logits(cfg, splits, "cpu")
    assert all(torch.allclose(first[k], again[k]) for k in first)
