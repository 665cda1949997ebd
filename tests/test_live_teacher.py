"""With ``data.augment`` the teacher is run on the very augmented tensor the student is fed, every step —
real steps and the look-ahead unrolls alike (issue 30, item 4); without it the cached logits are used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from metakd.config import Config
from metakd.data import load_data
from metakd.data import teacher as teacher_mod
from metakd.data.batches import BatchStream
from metakd.data.targets import CachedLogits, LiveTeacher
from metakd.runs.build import build
from metakd.runs.config import load_config
from metakd.runs.run import load_trainer, train_run
from metakd.training.trainer import Trainer


def _write_folder(root: Path, classes: tuple[str, ...], per_class: int, size: int = 8) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


class Recorder(nn.Module):
    """The teacher, recording every input it is run on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "device=cpu", "seed=0", "data.name=imagefolder", f"data.root={tmp_path / 'images'}",
        "data.n_train=12", "data.n_val=6", "data.n_test=9", "data.data_seed=0",
        "data.augment=true", f"data.cache_dir={tmp_path / 'cache'}",
        "student.name=mlp", "teacher.model.name=mlp", "teacher.epochs=3", "teacher.lr=0.01",
        "train.batch_size=4", "train.epochs=2", "train.compile=off", "train.eval_every=0",
        "wandb.mode=disabled", *extra,
    ]  # fmt: skip


# a fixed λ: the tests look at the teacher's targets, not at λ
FIXED = ("meta.method=fixed", "meta.values.beta1=0.5", "meta.values.beta2=0.5",
         "meta.values.temperature=2.0")  # fmt: skip


@pytest.fixture
def image_cfg(tmp_path: Path) -> Config:
    _write_folder(tmp_path / "images", ("cat", "dog", "emu"), per_class=10)
    return load_config(
        None,
        _overrides(
            tmp_path,
            *FIXED,
        ),
    )


@pytest.fixture
def checkpoint_teacher(image_cfg: Config, tmp_path: Path) -> Path:
    """A teacher checkpoint of the image task; ``teacher.checkpoint`` names it."""
    splits = load_data(image_cfg.data, image_cfg.seed, "cpu")
    model, metrics = teacher_mod.train_teacher(image_cfg, splits, "cpu")
    return teacher_mod.save_teacher(tmp_path / "teacher.pt", model, image_cfg, metrics)


def _recorded_trainer(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> tuple[Trainer, Recorder, nn.Module]:
    """The run's trainer as :func:`build` wires it, its teacher wrapped in a :class:`Recorder`, and a
    separate copy of the teacher (eval mode) for reference targets."""
    assert cfg.teacher.checkpoint is not None
    real_load = teacher_mod.load_teacher
    recorders: list[Recorder] = []

    def load(path: Any, device: Any) -> tuple[nn.Module, dict[str, Any]]:
        model, info = real_load(path, device)
        recorders.append(Recorder(model))
        return recorders[-1], info

    monkeypatch.setattr(teacher_mod, "load_teacher", load)
    splits, targets, student = build(cfg, torch.device("cpu"))
    monkeypatch.undo()
    reference, _ = teacher_mod.load_teacher(cfg.teacher.checkpoint, "cpu")
    (recorder,) = recorders
    recorder.inputs.clear()
    return Trainer(cfg, student, splits, targets, device="cpu"), recorder, reference


def _is_stored(x: Tensor, stored: Tensor) -> bool:
    """Every row of x is one of the stored (un-augmented) inputs."""
    return all(any(torch.equal(row, s) for s in stored) for row in x)


def test_teacher_and_student_see_the_same_augmented_batch(
    image_cfg: Config, checkpoint_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = image_cfg.model_copy(
        update={
            "teacher": image_cfg.teacher.model_copy(update={"checkpoint": str(checkpoint_teacher)})
        }
    )
    trainer, recorder, reference = _recorded_trainer(cfg, monkeypatch)
    fed: list[tuple[Tensor, Tensor]] = []  # (student input, targets in the loss) of each real step
    loss = trainer.loss

    def recording_loss(logits: Tensor, y: Tensor, t: Tensor | None, lam: Any) -> Tensor:
        assert t is not None
        fed.append((student_inputs[-1], t.detach().clone()))
        return loss(logits, y, t, lam)

    student_inputs: list[Tensor] = []
    trainer.model.register_forward_pre_hook(
        lambda m, args: student_inputs.append(args[0].detach().clone()) if m.training else None
    )
    trainer.loss = recording_loss  # type: ignore[method-assign]
    trainer.train()

    assert len(fed) == trainer.total_steps == 6
    # one teacher evaluation per step, on the very tensor the student was fed
    assert len(recorder.inputs) == len(fed)
    augmented = 0
    for seen, (x, t) in zip(recorder.inputs, fed, strict=True):
        assert torch.equal(seen, x)
        with torch.no_grad():
            assert torch.equal(t, reference(x).float())  # the targets are teacher(x_aug)
        augmented += not _is_stored(x, trainer.splits.train.x)
    assert augmented > 0  # the batches really were augmented


def test_look_ahead_batches_carry_the_live_targets_of_the_real_steps(
    image_cfg: Config, checkpoint_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = image_cfg.meta.model_copy(update={"method": "hypergrad", "unroll": 2})
    cfg = image_cfg.model_copy(
        update={
            "meta": meta,
            "teacher": image_cfg.teacher.model_copy(update={"checkpoint": str(checkpoint_teacher)}),
        }
    )
    trainer, recorder, reference = _recorded_trainer(cfg, monkeypatch)
    real: list[tuple[Tensor, Tensor]] = []
    ahead: list[tuple[Tensor, Tensor]] = []
    plain, train_loss = trainer.plain_real_step, trainer.train_loss

    def real_step(batch: Any) -> float:
        real.append((batch[0].clone(), batch[2].clone()))
        return plain(batch)

    def unrolled_loss(params: Any, meta: Any, batch: Any) -> Tensor:
        ahead.append((batch[0].detach().clone(), batch[2].detach().clone()))
        return train_loss(params, meta, batch)

    trainer.plain_real_step = real_step  # type: ignore[method-assign]
    trainer.train_loss = unrolled_loss  # type: ignore[method-assign]
    trainer.train()

    assert len(real) == 6 and trainer.counters["hypergradient_steps"] == 6
    assert len(ahead) >= 2 * 5  # η = 2 batches per meta step (the last looks past the run's end)
    for x, t in ahead:
        with torch.no_grad():
            assert torch.equal(t, reference(x).float())
    # the meta step at s unrolls the batches of real steps s and s + 1, with the same targets
    for k, (x, t) in enumerate(real):
        assert any(torch.equal(x, ax) and torch.equal(t, at) for ax, at in ahead[2 * k : 2 * k + 2])
        assert any(torch.equal(x, seen) for seen in recorder.inputs)


def test_deterministic_inputs_use_the_cached_logits(tmp_path: Path) -> None:
    _write_folder(tmp_path / "images", ("cat", "dog", "emu"), per_class=10)
    cfg = load_config(
        None,
        _overrides(
            tmp_path,
            *FIXED,
            "data.augment=false",
        ),
    )
    splits, targets, _ = build(cfg, torch.device("cpu"))
    assert isinstance(targets, CachedLogits)
    assert torch.equal(targets.logits, teacher_mod.teacher_logits(cfg, splits, "cpu")["train"])
    live = load_config(
        None,
        _overrides(
            tmp_path,
            *FIXED,
        ),
    )
    _, targets, _ = build(live, torch.device("cpu"))
    assert isinstance(targets, LiveTeacher) and not targets.module.training
    # the augmentation-with-cached-logits combination is refused
    with pytest.raises(ValueError, match="live teacher"):
        BatchStream(splits, torch.zeros(12, 3), seed=0, batch_size=4, augment=True)


def test_in_process_live_teacher_is_cached_and_resume_is_exact(tmp_path: Path) -> None:
    """An in-process teacher is trained once and cached, so a run rebuilt from its epoch-1 checkpoint
    (a resume) gets the same teacher weights and ends exactly as the uninterrupted run."""
    _write_folder(tmp_path / "images", ("cat", "dog", "emu"), per_class=10)
    over = _overrides(
        tmp_path, "meta.method=hypergrad", "meta.unroll=2", "train.checkpoint_every=1"
    )
    full = train_run(load_config(None, over), tmp_path / "run")
    assert len(list((tmp_path / "cache").glob("teacher-model-*.pt"))) == 1
    resumed = load_trainer(tmp_path / "run", epoch=1)
    assert isinstance(resumed.stream.teacher, LiveTeacher) and resumed.step == 3
    again = resumed.train()
    for key in ("meta", "meta_raw", "test_accuracy", "val_accuracy", "train_loss", "steps"):
        assert again[key] == full[key], key
