"""The student's lr schedule (train.lr_schedule, metakd.functional.schedules): f(t) against torch's
schedulers, the real optimizer against a hand-written torch.optim + lr_scheduler loop, the unroll's
twin against the real steps, and hypergradients through scheduled steps against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metakd.hypergrad
from metakd.functional.schedules import LrSchedule
from metakd.runs.check_grad import check_grad
from metakd.runs.config import load_config

LR, N = 0.05, 60


def _torch_lrs(make) -> list[float]:  # type: ignore[no-untyped-def]
    """The lr torch's scheduler sets before each of N updates."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = make(opt)
    lrs = []
    for _ in range(N):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    ("schedule", "make"),
    [
        (LrSchedule("cosine", N), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=N)),
        (LrSchedule("cosine", N, min_ratio=0.1),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=N, eta_min=0.1 * LR)),
        (LrSchedule("multistep", N, milestones=(20, 45), gamma=0.2),
         lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[20, 45], gamma=0.2)),
        (LrSchedule("cosine", N, warmup_steps=10, warmup_start=0.25),
         lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
             torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=10),
             torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=N - 10)], milestones=[10])),
    ],
    ids=["cosine", "cosine-floor", "multistep", "warmup-cosine"],
)  # fmt: skip
def test_the_factor_is_torchs_scheduler(schedule, make) -> None:
    ours = [LR * schedule(t) for t in range(N)]
    # torch's cosine is a recursion over steps: agreement to float64 round-off accumulated over N
    np.testing.assert_allclose(ours, _torch_lrs(make), rtol=1e-9, atol=1e-15)


def test_epochs_become_steps() -> None:
    s = LrSchedule.of("multistep", total_steps=100, steps_per_epoch=10, milestones=[3, 7],
                      warmup_epochs=0.5)  # fmt: skip
    assert s.milestones == (30, 70) and s.warmup_steps == 5
    assert s(29) == 1.0 and s(30) == pytest.approx(0.1) and s(70) == pytest.approx(0.01)
    assert LrSchedule().trivial and not s.trivial


def _trainer(*overrides: str):  # type: ignore[no-untyped-def]
    from metakd.data import load_data
    from metakd.training.trainer import Trainer

    cfg = load_config(None, ["device=cpu", "train.compile=off", "data.n_train=24",
                             "train.batch_size=8", "train.epochs=6", *overrides])  # fmt: skip
    splits = load_data(cfg.data, 0, "cpu")
    torch.manual_seed(0)
    logits = {k: torch.randn(len(getattr(splits, k)), 2) for k in ("train", "val", "test")}
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return Trainer(cfg, model, splits, logits, device="cpu")


SGD_RECIPE = ["train.optimizer=sgd", "train.lr=0.2", "train.momentum=0.9", "train.weight_decay=5e-4",
              "meta.method=fixed", "meta.values.beta1=0.5", "meta.values.beta2=0.5",
              "meta.values.temperature=4"]  # fmt: skip


def test_the_real_steps_are_torch_sgd_with_multistep_lr() -> None:
    tr = _trainer(*SGD_RECIPE, "train.lr_schedule=multistep", "train.lr_milestones=[2,4]")
    ref = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ref.load_state_dict(tr.model.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    steps = tr.steps_per_epoch  # 3 batches per epoch: milestones at steps 6 and 12
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2 * steps, 4 * steps])
    lam = {k: v.detach() for k, v in tr.lambdas().items()}
    for s in range(tr.total_steps):
        x, y, t = tr.batch(s)
        opt.zero_grad()
        tr.loss(ref(x), y, t, lam).backward()
        opt.step()
        sched.step()
    tr.train()
    for p, q in zip(tr.model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_unroll_takes_the_real_steps_learning_rates(optimizer) -> None:
    """An η = 4 unroll from step 2 (inside the warm-up, across its end) lands on the weights of the
    4 real steps that follow: update t + k of the twin uses f(t + k)."""
    over = [*SGD_RECIPE, f"train.optimizer={optimizer}", "train.lr_schedule=cosine",
            "train.lr_warmup_epochs=1.5"]  # fmt: skip
    tr = _trainer(*over)
    for s in range(2):
        tr.plain_real_step(tr.batch(s))
        tr.step = s + 1
    inner, state = tr.inner_optimizer()
    params = {k: p.detach() for k, p in tr.model.named_parameters()}
    res = metakd.hypergrad.hypergradient(
        tr.train_loss,
        tr.val_loss,
        params,
        tr.meta.raw,
        [tr.batch(s) for s in range(2, 6)],
        tr.val_batch(0),
        optimizer=inner,
        opt_state=state,
    )
    for s in range(2, 6):
        tr.plain_real_step(tr.batch(s))
        tr.step = s + 1
    for name, p in tr.model.named_parameters():
        torch.testing.assert_close(res.params[name], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.1"],
        ["train.optimizer=adam", "train.lr=0.05", "meta.hypergrad.method=forward"],
        ["train.optimizer=adam", "meta.params.lr.constraint=exp", "meta.params.lr.init=0.05"],
        ["train.optimizer=sgd", "train.lr=0.1", "meta.hypergrad.method=online"],
    ],
    ids=["reverse-sgd", "forward-adam", "reverse-learned-lr", "online-sgd"],
)
def test_hypergradients_through_scheduled_steps_match_finite_differences(cache, overrides) -> None:
    """check_grad's float64 reference re-runs the η = 3 unroll with lr·f(t) at each of its updates;
    the warm-up (5 steps from 0.5·lr: 0.5, 0.6, 0.7) makes the three updates' learning rates differ
    (a lower start shrinks the loss weights' hypergradients toward float32's noise floor, ~1e-9)."""
    cfg = load_config(None, [
        "device=cpu", "teacher.epochs=200", "train.epochs=40", f"data.cache_dir={cache}",
        "wandb.mode=disabled", "meta.unroll=3", "train.lr_schedule=cosine",
        "train.lr_warmup_epochs=5", "train.lr_warmup_start=0.5", *overrides,
    ])  # fmt: skip
    result = check_grad(cfg, eps=1e-4)
    for name, entry in result.items():
        hg, fd = np.atleast_1d(entry["hypergrad"]), np.atleast_1d(entry["finite_difference"])
        assert np.abs(hg).max() > 1e-7, name
        assert np.abs(hg - fd).max() / np.abs(fd).max() < 1e-4, (name, entry)


def test_backends_that_cannot_follow_a_schedule_say_so() -> None:
    tr = _trainer(*SGD_RECIPE, "train.lr_schedule=cosine")
    inner, state = tr.inner_optimizer()
    params = {k: p.detach() for k, p in tr.model.named_parameters()}
    with pytest.raises(ValueError, match="does not follow an lr schedule"):
        metakd.hypergrad.hypergradient(
            tr.train_loss,
            tr.val_loss,
            params,
            tr.meta.raw,
            [tr.batch(0)],
            tr.val_batch(0),
            optimizer=inner,
            opt_state=state,
            backend="torchopt",
        )
