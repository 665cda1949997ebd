"""The streaming path (issue 30, item 2): data.in_memory=false reads the train batches through a DataLoader,
step by step, and ends where the in-memory path ends; batches stay a pure function of (seed, step), so the
look-ahead sees the real steps' batches and a resumed run ends as the uninterrupted one. All of these fail on
the code before it (no data.in_memory key, no metakd.data.streaming)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from metakd.config import Config, ConfigError
from metakd.data import load_data
from metakd.data.loader import StepLoader
from metakd.data.streaming import Rows
from metakd.runs.build import build
from metakd.runs.config import load_config
from metakd.training.trainer import Trainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 tiny 8x8 RGB PNGs in 2 classes (the class shows in the mean colour)."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for i in range(64):
        c = i % 2
        d = root / f"c{c}"
        d.mkdir(exist_ok=True)
        px = rng.integers(0, 160, (8, 8, 3)) + 60 * c
        Image.fromarray(px.astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def _cfg(folder: Path, tmp: Path, *extra: str) -> Config:
    return load_config(None, [
        "data.name=imagefolder", f"data.root={folder}", f"data.cache_dir={tmp / 'cache'}",
        "data.n_train=32", "data.n_val=8", "data.n_test=8", "data.loader.num_workers=0",
        "student.name=logreg", "teacher.model.name=logreg", "teacher.epochs=20", "teacher.batch_size=16",
        "train.epochs=3", "train.batch_size=8", "train.eval_every=0", "meta.method=hypergrad",
        "meta.unroll=2", "meta.lr=0.1", "device=cpu", *extra,
    ])  # fmt: skip


def _trainer(cfg: Config) -> Trainer:
    splits, targets, model = build(cfg, torch.device("cpu"))
    return Trainer(cfg, model, splits, targets, device="cpu")


def _raw(trainer: Trainer) -> torch.Tensor:
    meta = trainer.meta
    assert meta is not None
    return torch.cat([meta.raw[n].detach().flatten() for n in meta.names])


def _run(cfg: Config) -> tuple[Trainer, list[list[float]]]:
    trainer = _trainer(cfg)
    lams: list[list[float]] = []
    while trainer.step < trainer.total_steps:
        trainer._one_step(trainer.step)
        lams.append(_raw(trainer).tolist())
    return trainer, lams


def test_streaming_and_in_memory_give_the_same_lambda_trajectory_and_weights(
    folder: Path, tmp_path: Path
) -> None:
    mem, lam_mem = _run(_cfg(folder, tmp_path, "data.in_memory=true"))
    stream, lam_stream = _run(_cfg(folder, tmp_path, "data.in_memory=false"))
    assert isinstance(stream.splits.train.x, Rows) and not isinstance(mem.splits.train.x, Rows)
    assert stream.splits.info["fingerprint"] == mem.splits.info["fingerprint"]  # one data
    # the same float32 ops on the same decoded pixels, same exact statistics: bit for bit
    assert lam_stream == lam_mem and len(lam_mem) == 12
    for a, b in zip(mem.model.parameters(), stream.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(mem.splits.val.x, stream.splits.val.x)


def test_streamed_batches_of_steps_s_to_s_plus_eta_are_the_look_aheads(
    folder: Path, tmp_path: Path
) -> None:
    cfg = _cfg(folder, tmp_path, "data.in_memory=false", "data.loader.num_workers=2", "meta.unroll=3",
               "data.train_transform=[{name: RandomHorizontalFlip}]")  # fmt: skip
    trainer = _trainer(cfg)
    assert isinstance(trainer.stream.loader, StepLoader)
    seen: list[Any] = []
    method = trainer.hypergrad_method
    assert method is not None
    real = trainer.train_loss

    def spy(params: Any, meta: Any, batch: Any) -> Any:
        seen.append(batch)
        return real(params, meta, batch)

    trainer.train_loss = spy  # type: ignore[method-assign]
    trainer.schedule.before_real_step(0)  # the meta step at 0: unrolls steps 0, 1, 2
    assert len(seen) == 3
    fresh = _trainer(cfg)  # another stream, its loader restarted: the batches of (seed, step)
    for s in range(3):
        x, y, t = trainer.stream.batch(s)
        assert x is seen[s][0]  # the buffered tensor the real step will consume
        fx, fy, ft = fresh.stream.batch(s)
        assert torch.equal(x, fx) and torch.equal(y, fy) and torch.equal(t, ft)
    # the loader's rows are the in-memory path's rows of (seed, step)
    mem = _trainer(_cfg(folder, tmp_path, "data.in_memory=true", "meta.unroll=3",
                        "data.train_transform=[{name: RandomHorizontalFlip}]"))  # fmt: skip
    for s in (0, 5, 7):
        assert torch.equal(mem.stream.batch(s)[0], fresh.stream.batch(s)[0])
        assert torch.equal(mem.stream.batch(s).ids, fresh.stream.batch(s).ids)


def test_resumed_streaming_run_ends_as_the_uninterrupted_one(folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(folder, tmp_path, "data.in_memory=false", "data.loader.num_workers=2", "train.epochs=2",
               "data.train_transform=[{name: RandomHorizontalFlip}]")  # fmt: skip
    whole, _ = _run(cfg)
    first = _trainer(cfg)
    for s in range(6):  # mid-epoch (4 steps an epoch)
        first._one_step(s)
        first.step = s + 1
    state = first.state_dict()
    resumed = _trainer(cfg)  # rebuilt: a fresh stream, loader started at step 6
    resumed.load_state_dict(state)
    resumed.train()
    assert resumed.step == whole.step
    assert torch.equal(_raw(resumed), _raw(whole))
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_auto_streams_when_the_budget_is_tiny_and_keeps_small_data_in_memory(
    folder: Path, tmp_path: Path
) -> None:
    # 64 images of 8 x 8 x 3 bytes and their float32 splits: more than 10 kB
    small = _cfg(folder, tmp_path, "data.memory_budget_mb=0.01").data
    assert isinstance(load_data(small, 0, "cpu").train.x, Rows)
    roomy = _cfg(folder, tmp_path).data  # default: a quarter of the RAM
    assert roomy.in_memory == "auto" and not isinstance(load_data(roomy, 0, "cpu").train.x, Rows)
    with pytest.raises(ConfigError, match=r"data\.in_memory=false"):
        load_data(load_config(None, ["data.in_memory=false"]).data, 0, "cpu")


def test_streamed_dataset_source_matches_in_memory_to_float_round_off(tmp_path: Path) -> None:
    """A factory of float examples (the digits): the statistics come from streamed sums."""
    base = ["data.name=plugins.my_data:digits", "data.n_train=100", "data.n_val=50", "data.n_test=50",
            f"data.cache_dir={tmp_path}"]  # fmt: skip
    mem = load_data(load_config(None, [*base, "data.in_memory=true"]).data, 0, "cpu")
    st = load_data(load_config(None, [*base, "data.in_memory=false"]).data, 0, "cpu")
    assert isinstance(st.train.x, Rows) and torch.equal(mem.train.y, st.train.y)
    # float64 sums in another order: the normalised inputs agree to float32 round-off
    torch.testing.assert_close(st.train.x[torch.arange(100)], mem.train.x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.test.x, mem.test.x, rtol=1e-5, atol=1e-5)
