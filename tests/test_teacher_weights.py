"""Any ``nn.Module`` as the teacher (issue 30, item 4): a torchvision model by import path with a state_dict
file (``teacher.weights``), loaded strictly, never trained, run in eval mode on the very augmented batch the
student is fed; a file that does not fit is one line naming the keys; its logit cache keys hash the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor
from typer.testing import CliRunner

from metakd.config import Config, ConfigError
from metakd.data import load_data
from metakd.data import teacher as teacher_mod
from metakd.data.targets import CachedLogits, LiveTeacher
from metakd.runs.build import build
from metakd.runs.config import load_config
from metakd.training.trainer import Trainer
from metakd_cli.main import app

RESNET = "torchvision.models:resnet18"


def _resnet(seed: int = 0, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def _overrides(tmp_path: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "device=cpu", "seed=0", "data.name=torchvision.datasets:FakeData", "data.kwargs.size=60",
        "data.kwargs.image_size=[3, 16, 16]", "data.kwargs.num_classes=10", "data.n_train=12",
        "data.n_val=8", "data.n_test=8", "data.data_seed=0", "data.augment=true",
        f"data.cache_dir={tmp_path / 'cache'}", "student.name=mlp", f"teacher.model.name={RESNET}",
        "teacher.model.kwargs={num_classes: 10}", f"teacher.weights={weights}",
        "meta.method=fixed", "meta.values={beta1: 0.5, beta2: 0.5, temperature: 2.0}",
        "train.batch_size=4", "train.epochs=2", "train.compile=off", "train.eval_every=0",
        "wandb.mode=disabled", *extra,
    ]  # fmt: skip


def _cfg(tmp_path: Path, weights: Path, *extra: str) -> Config:
    return load_config(None, _overrides(tmp_path, weights, *extra))


def test_torchvision_teacher_with_weights_runs_live_on_the_augmented_batch(tmp_path: Path) -> None:
    reference = _resnet(seed=0)
    weights = _save(reference, tmp_path / "resnet18.pt")
    cfg = _cfg(tmp_path, weights)
    splits, targets, student = build(cfg, torch.device("cpu"))
    assert isinstance(targets, LiveTeacher) and not targets.module.training
    assert isinstance(targets.module, torchvision.models.ResNet)
    assert all(not p.requires_grad for p in targets.module.parameters())
    trainer = Trainer(cfg, student, splits, targets, device="cpu")
    fed: list[tuple[Tensor, Tensor]] = []  # (student input, targets in the loss) of each real step
    inputs: list[Tensor] = []
    student.register_forward_pre_hook(
        lambda m, args: inputs.append(args[0].detach().clone()) if m.training else None
    )
    loss = trainer.loss

    def recording_loss(logits: Tensor, y: Tensor, t: Tensor | None, lam: Any) -> Tensor:
        assert t is not None
        fed.append((inputs[-1], t.detach().clone()))
        return loss(logits, y, t, lam)

    trainer.loss = recording_loss  # type: ignore[method-assign]
    trainer.train()
    assert len(fed) == trainer.total_steps == 6
    augmented = 0
    for x, t in fed:
        with torch.no_grad():
            assert torch.equal(t, reference(x).float())  # the targets are resnet18(x_aug)
        augmented += not any(torch.equal(x[0], s) for s in splits.train.x)
    assert augmented > 0  # the batches really were augmented
    # the teacher was never trained: its weights are the file's
    for k, v in reference.state_dict().items():
        assert torch.equal(targets.module.state_dict()[k], v), k
    # no teacher was trained or cached as a model
    assert not list((tmp_path / "cache").glob("teacher-model-*.pt"))


def test_weights_that_do_not_fit_are_one_line_naming_the_keys(tmp_path: Path) -> None:
    five = _save(_resnet(num_classes=5), tmp_path / "five.pt")
    with pytest.raises(ConfigError) as info:
        build(_cfg(tmp_path, five), torch.device("cpu"))
    msg = str(info.value)
    assert "\n" not in msg and "five.pt" in msg
    assert "fc.weight [5, 512] vs [10, 512]" in msg and "fc.bias [5] vs [10]" in msg
    renamed = {k.replace("layer1.", "block1."): v for k, v in _resnet().state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(ConfigError) as info:
        build(_cfg(tmp_path, tmp_path / "renamed.pt"), torch.device("cpu"))
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing keys layer1.0.bn1.bias" in msg and "unexpected keys block1.0.bn1.bias" in msg
    assert "more)" in msg  # 30 keys each way: the first few named, the rest counted
    # the same through the command line: exit 2, the error's one line first (then where the run is kept)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "-q", *_overrides(tmp_path, five)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert "fc.weight [5, 512] vs [10, 512]" in errors[0], result.output
    out = tmp_path / "run2"
    # a missing file is refused before the run directory exists
    result = CliRunner().invoke(
        app, ["train", "--out", str(out), "-q", *_overrides(tmp_path, tmp_path / "nope.pt")]
    )
    assert result.exit_code == 2 and "does not exist" in result.output and not out.exists()
    with pytest.raises(ValueError, match="not both"):
        _cfg(tmp_path, five, f"teacher.checkpoint={five}")


def test_logit_cache_of_a_weights_teacher_is_keyed_by_the_file(tmp_path: Path) -> None:
    weights = _save(_resnet(seed=0), tmp_path / "w.pt")
    cfg = _cfg(tmp_path, weights, "data.augment=false")
    splits, targets, _ = build(cfg, torch.device("cpu"))
    assert isinstance(targets, CachedLogits)
    x = load_data(cfg.data, cfg.seed, "cpu").train.x
    with torch.no_grad():
        assert torch.equal(targets.logits, _resnet(seed=0)(x))
    first, _ = teacher_mod._logits_cache_path(cfg, splits)
    assert first.is_file()
    _save(_resnet(seed=1), weights)  # new weights, same path: a new key, new logits
    second, what = teacher_mod._logits_cache_path(cfg, splits)
    assert second != first and "w.pt" in what
    logits = teacher_mod.teacher_logits(cfg, splits, "cpu")
    with torch.no_grad():
        assert torch.equal(logits["train"], _resnet(seed=1)(x))
    # metakd teacher refuses to train a teacher that is given by its weights
    result = CliRunner().invoke(app, ["teacher", "-q", *_overrides(tmp_path, weights)])
    assert result.exit_code == 2 and "teacher.weights" in result.output
    assert json.dumps(str(weights))  # (the path is plain text)
