"""Hypergradients against central finite differences of the bilevel objective.

The reference F(λ) = L_val(w_η(λ)) is computed by an independent plain loop: a real ``nn.Module``
trained by ``torch.optim`` (not metakd.functional.optim) for η steps in float64; dF/dλ by central differences.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metakd
from metakd.functional import optim
from metakd.functional.losses import cross_entropy, distillation_loss
from metakd.functional.nn import FunctionalModel

DT = torch.float64
K = 3


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, K)).double()


def _cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, K),
    ).double()


def _data(kind: str, eta: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (8, 4) if kind == "mlp" else (8, 2, 4, 4)
    batches = []
    for _ in range(eta):
        x = torch.randn(*shape, generator=g, dtype=DT)
        y = torch.randint(0, K, (8,), generator=g)
        t = 2 * torch.randn(8, K, generator=g, dtype=DT)
        batches.append((x, y, t))
    vx = torch.randn(*shape, generator=g, dtype=DT)
    vy = torch.randint(0, K, (8,), generator=g)
    return batches, (vx, vy)


def _constrained(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "beta1": torch.sigmoid(raw["beta1"]),
        "beta2": torch.sigmoid(raw["beta2"]),
        "temperature": 0.1 + 9.9 * torch.sigmoid(raw["temperature"]),
    }


def _raw0() -> dict[str, torch.Tensor]:
    return {
        "beta1": torch.tensor(0.3, dtype=DT),
        "beta2": torch.tensor(-0.5, dtype=DT),
        "temperature": torch.tensor(-1.2, dtype=DT),
    }


def _loss_of(logits, y, t, raw):
    lam = _constrained(raw)
    return distillation_loss(
        logits, y, t, beta1=lam["beta1"], beta2=lam["beta2"], temperature=lam["temperature"]
    )


OPTIMIZERS = {
    "sgd": (lambda: optim.sgd(0.3), lambda p: torch.optim.SGD(p, lr=0.3)),
    "momentum": (
        lambda: optim.sgd(0.2, 0.9, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.01),
    ),
    "nesterov": (
        lambda: optim.sgd(0.2, 0.8, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, nesterov=True),
    ),
    # eps = 1e-2: with the default 1e-8 Adam's first step is ≈ -lr·sign(g), nearly independent of λ
    # (hypergradient ~1e-7, below what float64 finite differences of the reference resolve to 1e-5).
    "adam": (
        lambda: optim.adam(0.05, eps=1e-2, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=0.05, eps=1e-2, weight_decay=0.01),
    ),
}


def _reference_objective(module, raw, batches, val_batch, make_torch_opt):
    """F(λ): a plain loop with a real module and torch.optim, no metakd.functional.optim involved."""
    m = copy.deepcopy(module)
    m.train()
    opt = make_torch_opt(m.parameters())
    for x, y, t in batches:
        opt.zero_grad()
        _loss_of(m(x), y, t, raw).backward()
        opt.step()
    vx, vy = val_batch
    with torch.no_grad():
        return F.cross_entropy(m(vx), vy).item()


def _fd_hypergrad(module, raw, batches, val_batch, make_torch_opt, h=1e-3):
    """Fourth-order central differences (error O(h⁴) + roundoff/h), float64."""
    out = []
    for k in raw:

        def f(delta, k=k):
            shifted = {n: v.clone() for n, v in raw.items()}
            shifted[k] += delta
            return _reference_objective(module, shifted, batches, val_batch, make_torch_opt)

        out.append((-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h))
    return torch.tensor(out, dtype=DT)


def _metakd_hypergrad(module, raw, batches, val_batch, inner, method, backend, **kw):
    fmodel = FunctionalModel(module)

    def train_loss(params, meta, batch):
        x, y, t = batch
        return _loss_of(fmodel(params, x), y, t, meta)

    def val_loss(params, batch):
        x, y = batch
        return cross_entropy(fmodel(params, x), y)

    meta = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
    params = dict(module.named_parameters())
    before = {k: v.clone() for k, v in params.items()}
    res = metakd.hypergradient(
        train_loss, val_loss, params, meta, batches, val_batch, inner, method, backend, **kw
    )
    for k, v in params.items():  # w0 is not modified
        assert torch.equal(v, before[k])
    return res, torch.stack([res.grads[k] for k in raw])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


ENGINES = [
    ("reverse", "func", {}),
    ("reverse", "func", {"checkpoint": True}),
    ("reverse", "torchopt", {}),
    ("reverse", "higher", {}),
    ("forward", "func", {}),
]


@pytest.mark.parametrize("eta", [1, 3, 12])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method,backend,kw", ENGINES, ids=lambda e: str(e))
def test_exact_methods_match_finite_differences(method, backend, kw, opt_name, eta):
    make_inner, make_torch = OPTIMIZERS[opt_name]
    module = _mlp()
    batches, val = _data("mlp", eta)
    raw = _raw0()
    ref = _fd_hypergrad(module, raw, batches, val, make_torch)
    res, hg = _metakd_hypergrad(module, raw, batches, val, make_inner(), method, backend, **kw)
    assert res.finite
    assert _rel(hg, ref) <= 1e-5, (hg, ref)
    # w_η agrees with the plain loop's
    assert res.val_loss == pytest.approx(
        _reference_objective(module, raw, batches, val, make_torch), rel=1e-10
    )


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("method,backend,kw", ENGINES, ids=lambda e: str(e))
def test_cnn_with_batchnorm(method, backend, kw, opt_name):
    make_inner, make_torch = OPTIMIZERS[opt_name]
    module = _cnn()
    module.train()
    stats = {k: v.clone() for k, v in module.named_buffers()}
    batches, val = _data("cnn", 4)
    raw = _raw0()
    ref = _fd_hypergrad(module, raw, batches, val, make_torch)
    _, hg = _metakd_hypergrad(module, raw, batches, val, make_inner(), method, backend, **kw)
    assert _rel(hg, ref) <= 1e-5
    # an unroll leaves no BatchNorm update behind
    for k, v in module.named_buffers():
        assert torch.equal(v, stats[k]), k


def test_finite_difference_method_close_to_exact_one_step():
    module = _mlp()
    batches, val = _data("mlp", 1)
    raw = _raw0()
    _, exact = _metakd_hypergrad(module, raw, batches, val, optim.sgd(0.3), "reverse", "func")
    _, approx = _metakd_hypergrad(
        module, raw, batches, val, optim.sgd(0.3), "finite-difference", "func"
    )
    assert _rel(approx, exact) <= 1e-3


def test_finite_difference_method_error_is_order_eps_squared():
    """The DARTS estimate (η = 1, SGD) against fourth-order central differences of the bilevel
    objective F(λ) = L_val(w_1(λ)) (torch.optim.SGD, float64; that reference's own error ~1e-13):
    its error is C·fd_eps² with one constant C over three decades of fd_eps (within 2 %: the
    O(fd_eps⁴) term is 0.4 % of the error at 0.1), and at the default fd_eps = 0.01 it is ~1e-5 of
    the hypergradient (9.4e-6)."""
    module = _mlp()
    batches, val = _data("mlp", 1)
    raw = _raw0()
    ref = _fd_hypergrad(module, raw, batches, val, OPTIMIZERS["sgd"][1])
    consts = {}
    for fd_eps in (0.1, 0.01, 0.001):
        _, approx = _metakd_hypergrad(module, raw, batches, val, optim.sgd(0.3),
                                      "finite-difference", "func", fd_eps=fd_eps)  # fmt: skip
        err = float((approx - ref).norm())
        assert err > 1e3 * 1e-13  # far above the reference's error: the O(ε²) term is measured
        consts[fd_eps] = err / fd_eps**2
    c = consts[0.01]
    assert all(abs(k / c - 1) < 0.02 for k in consts.values()), consts
    assert c * 0.01**2 < 2e-5 * float(ref.norm())


def test_finite_difference_general_optimizer_uses_vjp_of_update():
    module = _mlp()
    batches, val = _data("mlp", 1)
    raw = _raw0()
    inner = optim.adam(0.05)
    _, exact = _metakd_hypergrad(module, raw, batches, val, inner, "reverse", "func")
    _, approx = _metakd_hypergrad(module, raw, batches, val, inner, "finite-difference", "func")
    assert _rel(approx, exact) <= 1e-3


def test_all_backends_agree_float32():
    module = _mlp().float()
    batches, val = _data("mlp", 5)
    batches = [tuple(t.float() if t.is_floating_point() else t for t in b) for b in batches]
    val = tuple(t.float() if t.is_floating_point() else t for t in val)
    raw = {k: v.float() for k, v in _raw0().items()}
    results = [
        _metakd_hypergrad(module, raw, batches, val, optim.adam(0.01), m, b, **kw)[1]
        for m, b, kw in ENGINES
    ]
    for r in results[1:]:
        assert _rel(r, results[0]) <= 1e-3


def test_learning_rate_as_metaparameter():
    """Any metaparameter works: here the inner learning rate (exp constraint) and a per-class weight."""
    module = _mlp()
    batches, val = _data("mlp", 3)
    fmodel = FunctionalModel(module)

    def train_loss(params, meta, batch):
        x, y, _ = batch
        w = torch.softmax(meta["class_w"], 0) * K
        return (F.cross_entropy(fmodel(params, x), y, reduction="none") * w[y]).mean()

    def val_loss(params, batch):
        return cross_entropy(fmodel(params, batch[0]), batch[1])

    raw = {
        "log_lr": torch.tensor(-1.0, dtype=DT),
        "class_w": torch.tensor([0.1, -0.2, 0.3], dtype=DT),
    }
    inner = optim.sgd(lambda m: torch.exp(m["log_lr"]), 0.5)

    def objective(r):
        p = {k: v.detach() for k, v in module.named_parameters()}
        state = inner.init(p)
        for b in batches:
            g = torch.autograd.grad(
                train_loss({k: v.requires_grad_(True) for k, v in p.items()}, r, b),
                list(p.values()),
            )
            p, state = inner.update(dict(zip(p, g)), state, p, r)
            p = {k: v.detach() for k, v in p.items()}
        return val_loss(p, val).item()

    flat = torch.cat([raw["log_lr"].reshape(1), raw["class_w"]])
    fd = []
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = 1e-6
        unpack = lambda f: {"log_lr": f[0], "class_w": f[1:]}  # noqa: E731
        fd.append((objective(unpack(flat + e)) - objective(unpack(flat - e))) / 2e-6)
    ref = torch.tensor(fd, dtype=DT)
    for method in ("reverse", "forward", "finite-difference"):
        bs = batches if method != "finite-difference" else batches[:1]
        meta = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
        res = metakd.hypergradient(
            train_loss, val_loss, dict(module.named_parameters()), meta, bs, val, inner, method
        )
        got = torch.cat([res.grads["log_lr"].reshape(1), res.grads["class_w"]])
        assert res.grads["class_w"].shape == (3,)
        if method != "finite-difference":
            assert _rel(got, ref) <= 1e-5, method


def test_errors_are_clear():
    module = _mlp()
    batches, val = _data("mlp", 1)
    fmodel = FunctionalModel(module)
    params = dict(module.named_parameters())
    meta = {k: v.requires_grad_(True) for k, v in _raw0().items()}

    def tl(p, m, b):
        return _loss_of(fmodel(p, b[0]), b[1], b[2], m)

    def vl(p, b):
        return cross_entropy(fmodel(p, b[0]), b[1])

    with pytest.raises(ValueError, match=r"supported: .*forward/func"):
        metakd.hypergradient(tl, vl, params, meta, batches, val, method="forward", backend="higher")
    with pytest.raises(ValueError, match="η"):
        metakd.hypergradient(tl, vl, params, meta, [], val)
    with pytest.raises(ValueError, match="scalar"):
        metakd.hypergradient(tl, lambda p, b: fmodel(p, b[0]), params, meta, batches, val)
    with pytest.raises(ValueError, match="η = 2"):
        metakd.hypergradient(tl, vl, params, meta, batches * 2, val, method="finite-difference")
    with pytest.raises(KeyError):
        metakd.hypergradient(tl, vl, params, {"beta1": meta["beta1"]}, batches, val)


def test_non_finite_hypergradient_is_flagged():
    module = _mlp()
    batches, val = _data("mlp", 1)
    fmodel = FunctionalModel(module)

    def tl(p, m, b):
        return _loss_of(fmodel(p, b[0]), b[1], b[2], m) * m["scale"]

    def vl(p, b):
        return cross_entropy(fmodel(p, b[0]), b[1])

    meta = {k: v.requires_grad_(True) for k, v in _raw0().items()}
    meta["scale"] = torch.tensor(float("nan"), dtype=DT, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = metakd.hypergradient(tl, vl, dict(module.named_parameters()), meta, batches, val)
    assert not res.finite


# --------------------------------------------------------------------------- online forward mode


def _online_hypergrad(module, raw, batches, val_batch, inner, decay=1.0, hvp="loop"):
    """Carry tangents through the η real steps (tangent_step), then ⟨∇L_val(w_η), Z_η⟩."""
    fmodel = FunctionalModel(module)

    def train_loss(params, meta, batch):
        x, y, t = batch
        return _loss_of(fmodel(params, x), y, t, meta)

    def val_loss(params, batch):
        return cross_entropy(fmodel(params, batch[0]), batch[1])

    params = {k: v.detach() for k, v in module.named_parameters()}
    state, tangents = inner.init_tuple(list(params.values())), None
    for batch in batches:
        params, state, tangents = metakd.hypergrad.tangent_step(
            train_loss, params, raw, batch, inner, state, tangents, decay=decay, hvp=hvp
        )
    res = metakd.hypergrad.tangent_hypergradient(val_loss, params, raw, val_batch, tangents)
    return res, torch.stack([res.grads[k] for k in raw])


@pytest.mark.parametrize("eta", [1, 3, 12])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_online_tangents_match_finite_differences(opt_name, eta):
    make_inner, make_torch = OPTIMIZERS[opt_name]
    module = _mlp()
    batches, val = _data("mlp", eta)
    raw = _raw0()
    ref = _fd_hypergrad(module, raw, batches, val, make_torch)
    res, hg = _online_hypergrad(module, raw, batches, val, make_inner())
    assert res.finite
    assert _rel(hg, ref) <= 1e-5, (hg, ref)
    assert res.val_loss == pytest.approx(
        _reference_objective(module, raw, batches, val, make_torch), rel=1e-10
    )


@pytest.mark.parametrize("hvp", ["loop", "batched"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_online_tangents_through_batchnorm(opt_name, hvp):
    make_inner, make_torch = OPTIMIZERS[opt_name]
    module = _cnn()
    module.train()
    batches, val = _data("cnn", 4)
    raw = _raw0()
    ref = _fd_hypergrad(module, raw, batches, val, make_torch)
    _, hg = _online_hypergrad(module, raw, batches, val, make_inner(), hvp=hvp)
    assert _rel(hg, ref) <= 1e-5


def test_online_decay_weights_older_steps_by_powers_of_gamma():
    """With γ, Z_η = Σ_k γ^(η-1-k) ∂w_η/∂λ_k: the derivative of F when the λ of step k moves by
    γ^(η-1-k)·δ — checked by central differences of the plain torch.optim loop with per-step λ."""
    make_inner, make_torch = OPTIMIZERS["adam"]
    module, raw, gamma, h = _mlp(), _raw0(), 0.5, 1e-3
    batches, (vx, vy) = _data("mlp", 5)

    def f(name, delta):
        m = copy.deepcopy(module).train()
        opt = make_torch(m.parameters())
        for k, (x, y, t) in enumerate(batches):
            shifted = dict(raw)
            shifted[name] = raw[name] + delta * gamma ** (len(batches) - 1 - k)
            opt.zero_grad()
            _loss_of(m(x), y, t, shifted).backward()
            opt.step()
        with torch.no_grad():
            return F.cross_entropy(m(vx), vy).item()

    ref = torch.tensor([(f(k, h) - f(k, -h)) / (2 * h) for k in raw], dtype=DT)
    _, hg = _online_hypergrad(module, raw, batches, (vx, vy), make_inner(), decay=gamma)
    assert _rel(hg, ref) <= 1e-5, (hg, ref)
    _, full = _online_hypergrad(module, raw, batches, (vx, vy), make_inner())
    assert _rel(hg, full) > 1e-2  # the decay changes the answer


def test_online_tangents_checkpoint_round_trip_and_errors():
    module = _mlp()
    batches, _ = _data("mlp", 2)
    inner, raw = optim.adam(0.05), _raw0()
    fmodel = FunctionalModel(module)

    def train_loss(params, meta, batch):
        return _loss_of(fmodel(params, batch[0]), batch[1], batch[2], meta)

    params = {k: v.detach() for k, v in module.named_parameters()}
    state = inner.init_tuple(list(params.values()))
    _, _, z = metakd.hypergrad.tangent_step(train_loss, params, raw, batches[0], inner, state)
    again = metakd.hypergrad.Tangents.from_list(list(params), z.to_list())
    assert all(torch.equal(again.params[k], z.params[k]) for k in params)
    assert len(again.state) == len(z.state) == 2 * len(params)  # Adam: m and v per parameter
    with pytest.raises(ValueError, match="hvp must be 'loop' or 'batched'"):
        metakd.hypergrad.tangent_step(train_loss, params, raw, batches[1], inner, state, z, hvp="x")
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        metakd.hypergrad.tangent_step(train_loss, params, raw, batches[1], inner, state, z, decay=2)
    sgd = optim.sgd(0.1)
    with pytest.raises(ValueError, match="tangents do not match"):
        metakd.hypergrad.tangent_step(
            train_loss, params, raw, batches[1], sgd, sgd.init_tuple(list(params.values())), z
        )
