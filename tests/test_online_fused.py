"""The online mode's fused real step: one forward/backward serves the tangent step and the real step,
and training moves exactly as with the separate real step (weights, BatchNorm statistics, the torch
optimizer's state, tangents and λ)."""

from __future__ import annotations

import pytest
import torch

from metakd.bench import e2e as bench_e2e
from metakd.training.methods.online import Online


def _online_trainer(fused: bool, method: str):
    cfg, splits, logits = bench_e2e._case("cifar", method=method, online=True)
    cfg.meta.hypergrad.online_decay = 0.99
    if method == "forecast":
        cfg.forecast.window = 2
    trainer = bench_e2e._trainer(cfg, splits, logits)
    online = trainer.hypergrad_method
    assert isinstance(online, Online)
    online.fused = fused
    return trainer


@pytest.mark.parametrize("method", ["hypergrad", "forecast"])
def test_fused_online_step_is_ordinary_training(method, monkeypatch):
    fused, separate = _online_trainer(True, method), _online_trainer(False, method)
    calls = {"plain": 0}
    plain = type(separate).plain_real_step

    def counting(self, batch):
        calls["plain"] += 1
        return plain(self, batch)

    monkeypatch.setattr(type(fused), "plain_real_step", counting)
    for s in range(5):
        separate._one_step(s)
    n_separate = calls["plain"]
    for s in range(5):
        fused._one_step(s)
    # forecast (windows of 2: optimize, predict, optimize): the predict window's 2 steps are plain
    assert n_separate == 5 and calls["plain"] - n_separate == (2 if method == "forecast" else 0)
    for (k, a), b in zip(fused.model.state_dict().items(), separate.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)  # incl. BatchNorm statistics
    sa, sb = fused.optimizer.state_dict()["state"], separate.optimizer.state_dict()["state"]
    for i in sb:
        assert float(sa[i]["step"]) == float(sb[i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[i][key], sb[i][key], rtol=1e-5, atol=1e-8)
    assert fused.meta is not None and separate.meta is not None
    for n in fused.meta.names:
        torch.testing.assert_close(fused.meta.raw[n], separate.meta.raw[n], rtol=1e-5, atol=1e-7)
    ta, tb = fused.hypergrad_method.tangents, separate.hypergrad_method.tangents
    assert (ta is None) == (tb is None)
    if ta is not None and tb is not None:
        for x, y in zip(ta.to_list(), tb.to_list(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
