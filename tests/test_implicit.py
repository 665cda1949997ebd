"""Implicit (IFT) hypergradients against finite differences of the *converged* inner solution.

The reference: for each perturbed λ the inner problem (strongly convex, float64) is solved to machine
precision by Newton's method with the exact Hessian (``torch.autograd.functional.hessian``), then
F(λ) = L_val(w*(λ)) is differenced with a fourth-order central stencil. A second, independent reference
is ``torchopt.diff.implicit.custom_root`` on the same problem.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metakd
from metakd.functional import optim
from metakd.functional.losses import cross_entropy, distillation_loss
from metakd.functional.nn import FunctionalModel
from metakd.hypergrad.implicit import (
    HVP_MODES,
    ImplicitResult,
    ImplicitSolver,
    implicit_hypergradient,
)

DT = torch.float64
D, K = 5, 3


def _logreg_data(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, D, generator=g, dtype=DT)
    y = x @ torch.randn(D, generator=g, dtype=DT) + 0.5 * torch.randn(40, generator=g, dtype=DT) > 0
    vx = torch.randn(30, D, generator=g, dtype=DT)
    vy = vx @ torch.randn(D, generator=g, dtype=DT) > 0
    return (x, y.to(DT)), (vx, vy.to(DT))


def _logit_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(x @ p["w"] + p["b"], y)


def _l2_train(p: dict[str, Tensor], m: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    """Logistic loss + Σ_j exp(r_j)/2 · w_j² (weight decay exp(r), scalar or one per feature)."""
    return _logit_loss(p, batch) + 0.5 * (m["log_wd"].exp() * p["w"] ** 2).sum()


def _distill_data(seed: int = 1) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, D, generator=g, dtype=DT)
    y = torch.randint(0, K, (30,), generator=g)
    t = 2 * torch.randn(30, K, generator=g, dtype=DT)
    vx = torch.randn(20, D, generator=g, dtype=DT)
    return (x, y, t), (vx, torch.randint(0, K, (20,), generator=g))


def _distill_train(p: dict[str, Tensor], m: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
    """Eq. 4 on a linear student (β1, β2, T metaparameters) + a fixed 0.05/2 ‖(W, c)‖² (strong convexity:
    softmax is shift-invariant in the logits)."""
    x, y, t = batch
    s = x @ p["W"] + p["c"]
    kd = distillation_loss(
        s, y, t, beta1=m["beta1"], beta2=m["beta2"], temperature=m["temperature"]
    )
    return kd + 0.025 * ((p["W"] ** 2).sum() + (p["c"] ** 2).sum())


def _distill_val(p: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    return cross_entropy(batch[0] @ p["W"] + p["c"], batch[1])


def _newton(loss, params: dict[str, Tensor], steps: int = 40) -> dict[str, Tensor]:
    """Minimise a strongly convex ``loss(params)`` by Newton's method on the flat vector (float64)."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def unflat(v: Tensor) -> dict[str, Tensor]:
        return {k: t.reshape(s) for k, t, s in zip(names, torch.split(v, sizes), shapes)}

    v = torch.cat([params[k].detach().reshape(-1) for k in names])
    for _ in range(steps):
        g = torch.func.grad(lambda u: loss(unflat(u)))(v)
        if float(g.norm()) < 1e-14:
            break
        h = torch.autograd.functional.hessian(lambda u: loss(unflat(u)), v)
        v = v - torch.linalg.solve(h, g)
    return unflat(v)


def _fd(train, val, params, meta, tb, vb, h: float = 1e-3) -> dict[str, Tensor]:
    """dF/dλ with F(λ) = L_val(w*(λ)), w* by Newton, fourth-order central differences per entry."""

    def f(m: dict[str, Tensor]) -> float:
        w = _newton(lambda p: train(p, m, tb), params)
        return float(val(w, vb))

    out = {}
    for k, v in meta.items():
        grad = torch.zeros_like(v).reshape(-1)
        for i in range(v.numel()):
            vals = []
            for step in (-2, -1, 1, 2):
                m = {q: u.clone() for q, u in meta.items()}
                m[k].view(-1)[i] += step * h
                vals.append(f(m))
            grad[i] = (vals[0] - 8 * vals[1] + 8 * vals[2] - vals[3]) / (12 * h)
        out[k] = grad.reshape(v.shape)
    return out


def _logreg_start() -> dict[str, Tensor]:
    return {"w": torch.zeros(D, dtype=DT), "b": torch.zeros((), dtype=DT)}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", [(), (D,)], ids=["scalar-wd", "per-feature-wd"])
def test_logreg_weight_decay_matches_converged_fd(shape: tuple[int, ...]) -> None:
    tb, vb = _logreg_data()
    log_wd = torch.linspace(-2.0, -0.5, D, dtype=DT) if shape else torch.tensor(-1.5, dtype=DT)
    meta = {"log_wd": log_wd}
    w_star = _newton(lambda p: _l2_train(p, meta, tb), _logreg_start())
    ref = _fd(_l2_train, _logit_loss, _logreg_start(), meta, tb, vb)
    for hvp in HVP_MODES:
        cfg = ImplicitSolver(iterations=50, tol=1e-14, hvp=hvp)
        res = implicit_hypergradient(_l2_train, _logit_loss, w_star, meta, [tb], vb, settings=cfg)
        assert isinstance(res, ImplicitResult) and res.finite
        assert res.stationarity < 1e-12 and res.solve_residual < 1e-12
        assert res.iterations <= D + 1  # CG is exact after at most P = D + 1 products
        assert res.grads["log_wd"].shape == shape
        assert _rel(res.grads["log_wd"], ref["log_wd"]) < 1e-7, hvp


def test_distillation_metaparameters_match_converged_fd() -> None:
    tb, vb = _distill_data()
    meta = {
        k: torch.tensor(v, dtype=DT)
        for k, v in (("beta1", 0.7), ("beta2", 0.4), ("temperature", 2.5))
    }
    start = {"W": torch.zeros(D, K, dtype=DT), "c": torch.zeros(K, dtype=DT)}
    w_star = _newton(lambda p: _distill_train(p, meta, tb), start)
    res = metakd.hypergradient(
        _distill_train,
        _distill_val,
        w_star,
        meta,
        [tb],
        vb,
        method="implicit",
        implicit=ImplicitSolver(iterations=100, tol=1e-14),
    )
    ref = _fd(_distill_train, _distill_val, start, meta, tb, vb)
    assert res.finite and res.stationarity < 1e-12  # type: ignore[attr-defined]
    for k in meta:
        assert _rel(res.grads[k], ref[k]) < 1e-6, k


def _nobias_loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    return _logit_loss({"w": p["w"], "b": torch.zeros((), dtype=DT)}, batch)


def test_optimizer_weight_decay_is_part_of_the_stationarity_condition() -> None:
    """wd as the inner optimizer's weight_decay (a metaparameter): its fixed points solve
    ∇L + wd·w = 0, so the reference is the converged solution of L + wd/2·‖w‖²."""
    tb, vb = _logreg_data()
    meta = {"log_wd": torch.tensor(-1.0, dtype=DT)}
    opt = optim.sgd(lr=0.5, weight_decay=lambda m: m["log_wd"].exp())

    def plain(p: dict[str, Tensor], m: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return _nobias_loss(p, batch)

    def l2(p: dict[str, Tensor], m: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return _nobias_loss(p, batch) + 0.5 * m["log_wd"].exp() * (p["w"] ** 2).sum()

    start = {"w": torch.zeros(D, dtype=DT)}
    w_star = _newton(lambda p: l2(p, meta, tb), start)
    cfg = ImplicitSolver(iterations=50, tol=1e-14)
    res = implicit_hypergradient(plain, _nobias_loss, w_star, meta, [tb], vb, opt, settings=cfg)
    ref = _fd(l2, _nobias_loss, start, meta, tb, vb)
    assert res.stationarity < 1e-12
    assert _rel(res.grads["log_wd"], ref["log_wd"]) < 1e-7
    # Without the optimizer's decay w* is not a stationary point of the plain loss: reported.
    off = implicit_hypergradient(plain, _nobias_loss, w_star, meta, [tb], vb, settings=cfg)
    assert off.stationarity > 1e-3


def test_distillation_matches_torchopt_custom_root() -> None:
    """torchopt.diff.implicit.custom_root (its own IFT, its own linear solver) on the same problem."""
    import torchopt
    from torchopt.diff.implicit import custom_root

    tb, vb = _distill_data()
    values = {"beta1": 0.7, "beta2": 0.4, "temperature": 2.5}
    start = {"W": torch.zeros(D, K, dtype=DT), "c": torch.zeros(K, dtype=DT)}

    def meta_of(b1: Tensor, b2: Tensor, temp: Tensor) -> dict[str, Tensor]:
        return {"beta1": b1, "beta2": b2, "temperature": temp}

    def optimality(w: tuple[Tensor, Tensor], b1: Tensor, b2: Tensor, temp: Tensor):
        m = meta_of(b1, b2, temp)
        return torch.func.grad(lambda ww: _distill_train({"W": ww[0], "c": ww[1]}, m, tb))(w)

    # torchopt's CG; its solve_inv() gave dF/dβ1 = 0.0278 on this problem against 0.0295 from the
    # converged finite differences and from its own solve_cg/solve_normal_cg (torchopt 0.7.3).
    cg = torchopt.linear_solve.solve_cg(maxiter=100, rtol=1e-13, atol=0.0)

    @custom_root(optimality, argnums=(1, 2, 3), solve=cg)
    def solve(w: tuple[Tensor, Tensor], b1: Tensor, b2: Tensor, temp: Tensor):
        m = {k: v.detach() for k, v in meta_of(b1, b2, temp).items()}
        sol = _newton(lambda p: _distill_train(p, m, tb), {"W": w[0], "c": w[1]})
        return sol["W"], sol["c"]

    lam = [torch.tensor(v, dtype=DT, requires_grad=True) for v in values.values()]
    w_opt = solve((start["W"], start["c"]), *lam)
    vloss = _distill_val({"W": w_opt[0], "c": w_opt[1]}, vb)
    ref = torch.autograd.grad(vloss, lam)

    meta = {k: torch.tensor(v, dtype=DT) for k, v in values.items()}
    w_star = {"W": w_opt[0].detach(), "c": w_opt[1].detach()}
    for solver, extra in (("cg", {}), ("neumann", {"neumann_lr": 1.0})):
        res = implicit_hypergradient(
            _distill_train,
            _distill_val,
            w_star,
            meta,
            [tb],
            vb,
            settings=ImplicitSolver(solver=solver, iterations=400, tol=1e-13, **extra),
        )
        for (k, g), r in zip(res.grads.items(), ref):
            assert _rel(g, r) < 1e-9, (solver, k)


def _spectrum(train, params, meta, tb) -> Tensor:
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def loss(v: Tensor) -> Tensor:
        parts = torch.split(v, sizes)
        return train({k: t.reshape(params[k].shape) for k, t in zip(names, parts)}, meta, tb)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))


def test_cg_and_neumann_agree_and_neumann_converges_as_predicted() -> None:
    tb, vb = _logreg_data()
    meta = {"log_wd": torch.tensor(-1.0, dtype=DT)}
    w_star = _newton(lambda p: _l2_train(p, meta, tb), _logreg_start())
    eig = _spectrum(_l2_train, w_star, meta, tb)
    alpha = 1.0 / float(eig.max())
    cg = implicit_hypergradient(
        _l2_train,
        _logit_loss,
        w_star,
        meta,
        [tb],
        vb,
        settings=ImplicitSolver(iterations=50, tol=0),
    )
    neu = implicit_hypergradient(
        _l2_train,
        _logit_loss,
        w_star,
        meta,
        [tb],
        vb,
        settings=ImplicitSolver(solver="neumann", iterations=30, neumann_lr=alpha, tol=0),
    )
    # Residual (I - αA)^J b: at most (1 - α λ_min)^J relative.
    bound = (1 - alpha * float(eig.min())) ** 30
    assert neu.iterations == 30 and neu.solve_residual <= bound * (1 + 1e-9)
    assert _rel(neu.grads["log_wd"], cg.grads["log_wd"]) < 2 * bound * float(eig.max() / eig.min())
    long = implicit_hypergradient(
        _l2_train,
        _logit_loss,
        w_star,
        meta,
        [tb],
        vb,
        settings=ImplicitSolver(solver="neumann", iterations=2000, neumann_lr=alpha, tol=1e-14),
    )
    assert _rel(long.grads["log_wd"], cg.grads["log_wd"]) < 1e-10
    assert long.iterations < 2000  # stopped at tol
    # Damping δ: the same as solving with A + δI, i.e. L2 term δ/2·‖(w, b)‖² in the Hessian only.
    damped = implicit_hypergradient(
        _l2_train,
        _logit_loss,
        w_star,
        meta,
        [tb],
        vb,
        settings=ImplicitSolver(iterations=50, damping=0.3, tol=1e-14),
    )
    assert 1e-3 < _rel(damped.grads["log_wd"], cg.grads["log_wd"]) < 1.0


def test_neumann_divergence_and_indefinite_hessian_warn() -> None:
    tb, vb = _logreg_data()
    meta = {"log_wd": torch.tensor(-1.0, dtype=DT)}
    w_star = _newton(lambda p: _l2_train(p, meta, tb), _logreg_start())
    eig = _spectrum(_l2_train, w_star, meta, tb)
    too_big = ImplicitSolver(solver="neumann", iterations=500, neumann_lr=3.0 / float(eig.max()))
    with pytest.warns(RuntimeWarning, match="Neumann series diverges"):
        res = implicit_hypergradient(
            _l2_train, _logit_loss, w_star, meta, [tb], vb, settings=too_big
        )
    assert not res.finite

    def concave(p: dict[str, Tensor], m: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return -_l2_train(p, m, batch)

    with pytest.warns(RuntimeWarning, match="not positive definite"):
        implicit_hypergradient(concave, _logit_loss, w_star, meta, [tb], vb)


def test_inner_steps_fit_w_and_report_stationarity() -> None:
    tb, vb = _logreg_data()
    meta = {"log_wd": torch.tensor(-1.0, dtype=DT)}
    ref = _fd(_l2_train, _logit_loss, _logreg_start(), meta, tb, vb)
    cfg = ImplicitSolver(iterations=50, tol=1e-14)
    raw = implicit_hypergradient(
        _l2_train, _logit_loss, _logreg_start(), meta, [tb], vb, settings=cfg
    )
    assert raw.stationarity > 0.05  # w = 0 is far from w*: the IFT answer is off, and says so
    assert _rel(raw.grads["log_wd"], ref["log_wd"]) > 0.05
    fit = implicit_hypergradient(
        _l2_train,
        _logit_loss,
        _logreg_start(),
        meta,
        [tb],
        vb,
        optim.sgd(lr=1.0, momentum=0.5),
        settings=ImplicitSolver(iterations=50, tol=1e-14, inner_steps=300),
    )
    assert fit.stationarity < 1e-10 and fit.opt_state.step == 300
    assert _rel(fit.grads["log_wd"], ref["log_wd"]) < 1e-7
    # Batches: L_train is their mean (two halves = the full batch).
    halves = [(tb[0][:20], tb[1][:20]), (tb[0][20:], tb[1][20:])]
    w_star = _newton(lambda p: _l2_train(p, meta, tb), _logreg_start())
    full = implicit_hypergradient(_l2_train, _logit_loss, w_star, meta, [tb], vb, settings=cfg)
    split = implicit_hypergradient(_l2_train, _logit_loss, w_star, meta, halves, vb, settings=cfg)
    assert _rel(split.grads["log_wd"], full.grads["log_wd"]) < 1e-10


def _bn_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, K)
    ).double()


def test_hvp_modes_agree_on_a_batchnorm_cnn() -> None:
    """Double backward (closed-form BatchNorm) and torch.func jvp-of-grad give the same products."""
    model = FunctionalModel(_bn_cnn())
    g = torch.Generator().manual_seed(4)
    tb = (
        torch.randn(8, 2, 4, 4, generator=g, dtype=DT),
        torch.randint(0, K, (8,), generator=g),
        torch.randn(8, K, generator=g, dtype=DT),
    )
    vb = (torch.randn(8, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, K, (8,), generator=g))
    meta = {
        "beta1": torch.tensor(0.6, dtype=DT),
        "beta2": torch.tensor(0.3, dtype=DT),
        "temperature": torch.full((K,), 2.0, dtype=DT),
    }

    def train(p: dict[str, Tensor], m: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        x, y, t = batch
        return distillation_loss(
            model(p, x), y, t, beta1=m["beta1"], beta2=m["beta2"], temperature=m["temperature"]
        )

    def val(p: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return cross_entropy(model(p, batch[0]), batch[1])

    params = model.params()
    out = {}
    for mode in ("autograd", "func"):
        cfg = ImplicitSolver(solver="neumann", iterations=5, neumann_lr=0.1, damping=0.5, hvp=mode)
        out[mode] = implicit_hypergradient(train, val, params, meta, [tb], vb, settings=cfg)
    for k in meta:
        assert out["autograd"].grads[k].shape == meta[k].shape
        assert _rel(out["func"].grads[k], out["autograd"].grads[k]) < 1e-10, k
    assert out["func"].solve_residual == pytest.approx(out["autograd"].solve_residual, rel=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "lbfgs"}, "unknown implicit solver 'lbfgs'; choose one of"),
        ({"hvp": "fd"}, "unknown hvp mode 'fd'"),
        ({"iterations": 0}, "iterations must be >= 1"),
        ({"iterations": 2.5}, "iterations must be an int"),
        ({"damping": -0.1}, "damping must be a finite number >= 0"),
        ({"neumann_lr": 0.0}, "neumann_lr must be > 0"),
        ({"inner_steps": -1}, "inner_steps must be >= 0"),
    ],
)
def test_bad_settings_raise_one_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImplicitSolver(**kwargs)


def test_bad_calls_raise_one_clear_error() -> None:
    tb, vb = _logreg_data()
    meta = {"log_wd": torch.tensor(-1.0, dtype=DT)}
    w = _logreg_start()
    with pytest.raises(ValueError, match="cannot tune the inner learning rate"):
        implicit_hypergradient(
            _l2_train, _logit_loss, w, meta, [tb], vb, optim.sgd(lr=lambda m: m["log_wd"].exp())
        )
    with pytest.raises(ValueError, match="solver='neumann' needs neumann_lr"):
        implicit_hypergradient(
            _l2_train,
            _logit_loss,
            w,
            meta,
            [tb],
            vb,
            optim.adam(lr=0.1),
            settings=ImplicitSolver(solver="neumann"),
        )
    with pytest.raises(ValueError, match="train_batches is empty"):
        implicit_hypergradient(_l2_train, _logit_loss, w, meta, [], vb)
    with pytest.raises(
        ValueError, match="method='implicit' with backend='torchopt' is not supported"
    ):
        metakd.hypergradient(
            _l2_train, _logit_loss, w, meta, [tb], vb, method="implicit", backend="torchopt"
        )
    with pytest.raises(
        ValueError, match=r"implicit=\.\.\. settings are for method='implicit' only"
    ):
        metakd.hypergradient(_l2_train, _logit_loss, w, meta, [tb], vb, implicit=ImplicitSolver())
