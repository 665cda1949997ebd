"""metakd.functional.optim steps against torch.optim over several steps; from_torch imports a live state."""

from __future__ import annotations

import pytest
import torch

from metakd.functional import optim

CASES = {
    "sgd": (lambda: optim.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd-wd": (
        lambda: optim.sgd(0.1, weight_decay=0.05),
        lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05),
    ),
    "momentum-dampening": (
        lambda: optim.sgd(0.05, 0.9, dampening=0.1),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
    ),
    "nesterov": (
        lambda: optim.sgd(0.05, 0.9, nesterov=True, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    "adam": (lambda: optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "adam-wd": (
        lambda: optim.adam(1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    ),
}


def _grads(step: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_steps_match_torch_optim(name):
    make_inner, make_torch = CASES[name]
    g = torch.Generator().manual_seed(0)
    init = {
        "w": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
    }
    torch_params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    topt = make_torch(list(torch_params.values()))
    inner = make_inner()
    params = {k: v.clone() for k, v in init.items()}
    state = inner.init(params)
    for step in range(8):
        grads = _grads(step, params)
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        topt.step()
        params, state = inner.update(grads, state, params)
        for k in params:
            torch.testing.assert_close(params[k], torch_params[k].detach(), rtol=1e-12, atol=1e-12)
    # the functional twin of the live optimizer continues exactly where torch.optim is
    twin, twin_state = optim.from_torch(topt, torch_params)
    grads = _grads(99, params)
    cont, _ = twin.update(
        grads, twin_state, {k: v.detach().clone() for k, v in torch_params.items()}
    )
    for k, p in torch_params.items():
        p.grad = grads[k].clone()
    topt.step()
    for k in params:
        torch.testing.assert_close(cont[k], torch_params[k].detach(), rtol=1e-12, atol=1e-12)


def test_update_is_pure_and_differentiable():
    p = {"w": torch.randn(3, requires_grad=True)}
    g = {"w": (p["w"] ** 2).detach().requires_grad_(True)}
    inner = optim.adam(0.1)
    state = inner.init(p)
    before = p["w"].detach().clone()
    new, _ = inner.update(g, state, p)
    assert torch.equal(p["w"].detach(), before)  # nothing in place
    new["w"].sum().backward()
    assert g["w"].grad is not None and p["w"].grad is not None


def test_bad_hyperparameters_name_the_value():
    with pytest.raises(ValueError, match=r"Invalid lr: -0\.1"):
        optim.sgd(-0.1)
    with pytest.raises(ValueError, match="betas"):
        optim.adam(0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="Nesterov"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"SGD and torch\.optim\.Adam"):
        optim.from_torch(torch.optim.RMSprop([torch.zeros(1, requires_grad=True)]), {})


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_scheduled_lr_matches_torch_schedulers_stepped_once_per_step(kind):
    """``scheduled_lr`` at step / (total − 1) equals torch's LinearLR / CosineAnnealingLR after
    ``step`` scheduler steps (the reference), from lr at step 0 to lr_end at the last step."""
    lr, lr_end, total = 0.05, 0.002, 41
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=lr)
    if kind == "linear":
        ref = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1.0, end_factor=lr_end / lr, total_iters=total - 1
        )
    else:
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - 1, eta_min=lr_end)
    for step in range(total):
        got = optim.scheduled_lr(kind, lr, lr_end, step / (total - 1))
        assert got == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        ref.step()
    assert optim.scheduled_lr(kind, lr, lr_end, 1.0) == pytest.approx(lr_end)
    assert optim.scheduled_lr(kind, lr, lr_end, 7.0) == pytest.approx(lr_end)  # clamped
    assert optim.scheduled_lr("constant", lr, lr_end, 0.5) == lr
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        optim.scheduled_lr("step", lr, lr_end, 0.5)
