"""Status lines for the library's long loops (issue 23, item 12): image decoding, a long teacher
epoch and check-grad say what they do instead of a silent minute."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import metakd.data.images
import metakd.data.teacher
import metakd.runs.check_grad
from metakd.config import Config
from metakd.data import decode_image_folder, load_data
from metakd.runs.config import load_config
from metakd.runs.run import check_grad
from metakd.status import StatusLine


def test_status_line_is_throttled_and_estimates_the_rest(caplog):
    now = [0.0]
    status = StatusLine(logging.getLogger("metakd.t"), "work", 100, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="metakd.t"):
        for _ in range(10):  # 9 s: before the first line is due
            now[0] += 0.9
            status.update(5)
        assert caplog.messages == []
        now[0] = 10.0
        status.update(5)  # 55 done at 10 s
        now[0] = 15.0
        status.update(5)  # not due: one line per 10 s
        now[0] = 20.0
        status.update(done=100)
    assert caplog.messages == ["work: 55/100 (55%), 10 s, ETA 8 s", "work: 100/100 (100%), 20 s"]
    assert status.lines == 2


def _eager(monkeypatch, module) -> None:
    """A StatusLine that logs on every update (a slow machine, compressed)."""
    monkeypatch.setattr(module, "StatusLine", functools.partial(StatusLine, after=0, every=0))


def test_image_decoding_says_what_it_decodes(tmp_path: Path, monkeypatch, caplog):
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(
                tmp_path / "imgs" / c / f"{i}.png"
            )
    _eager(monkeypatch, metakd.data.images)
    with caplog.at_level(logging.INFO, logger="metakd.data"):
        decode_image_folder(tmp_path / "imgs", tmp_path / "cache", workers=0)
    text = "\n".join(caplog.messages)
    assert "decoding 6 images under" in text and "in-process" in text
    assert f"decoding images under {tmp_path / 'imgs'}: 6/6 (100%)" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metakd.data"):  # the cache: nothing to say
        decode_image_folder(tmp_path / "imgs", tmp_path / "cache", workers=0)
    assert not [m for m in caplog.messages if "decoding" in m]


def test_a_long_teacher_epoch_logs_its_batches(tmp_path: Path, monkeypatch, caplog):
    cfg = Config()
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.teacher.epochs, cfg.teacher.batch_size = 2, 64
    splits = load_data(cfg.data, 0, "cpu")
    _eager(monkeypatch, metakd.data.teacher)
    with caplog.at_level(logging.INFO, logger="metakd.data.teacher"):
        metakd.data.teacher.train_teacher(cfg, splits, "cpu")
    batches = -(-len(splits.teacher) // 64)
    assert f"teacher: epoch 1/2, batch: 1/{batches:,}" in caplog.text
    assert f"teacher: epoch 2/2, batch: {batches:,}/{batches:,} (100%)" in caplog.text


@pytest.mark.parametrize("eager", [False, True])
def test_check_grad_says_what_it_computes(tmp_path: Path, monkeypatch, caplog, eager):
    if eager:
        import metakd.runs.run

        _eager(monkeypatch, metakd.runs.check_grad)
    cfg = load_config(
        None,
        ["device=cpu", "teacher.epochs=50", f"data.cache_dir={tmp_path}", "meta.unroll=2",
         "train.lr=0.05", "wandb.mode=disabled"],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="metakd"):
        check_grad(cfg)
    assert "check-grad: the reverse hypergradient over η = 2 steps" in caplog.text
    assert "check-grad: finite differences, 12 float64 unrolls of η = 2 steps" in caplog.text
    assert ("check-grad: finite differences, λ entries: 3/3 (100%)" in caplog.text) == eager
