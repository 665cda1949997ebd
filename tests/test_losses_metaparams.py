"""The distillation loss (eq. 4) against its definition; metaparameter constraints and their inverses."""

from __future__ import annotations

import math

import pytest
import torch

from metakd.config import MetaParamSpec
from metakd.functional.losses import accuracy, cross_entropy, distillation_loss
from metakd.functional.metaparams import MetaParams, constrain, unconstrain


def test_distillation_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        3 * torch.randn(6, 4, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    b1, b2, T = 0.3, 0.8, 2.5
    ref_hard = sum(-math.log(torch.softmax(s[i], 0)[y[i]]) for i in range(6)) / 6
    ref_soft = (
        sum(
            -(torch.softmax(t[i] / T, 0) * torch.log_softmax(s[i] / T, 0)).sum().item()
            for i in range(6)
        )
        / 6
    )
    got = distillation_loss(s, y, t, beta1=b1, beta2=b2, temperature=T)
    assert got.item() == pytest.approx(b1 * ref_hard + b2 * ref_soft, rel=1e-12)
    hinton = distillation_loss(s, y, t, beta1=b1, beta2=b2, temperature=T, hinton_scaling=True)
    assert hinton.item() == pytest.approx(b1 * ref_hard + b2 * T**2 * ref_soft, rel=1e-12)
    norm = distillation_loss(s, y, t, beta1=b1, beta2=b2, temperature=T, normalize_weights=True)
    assert norm.item() == pytest.approx((b1 * ref_hard + b2 * ref_soft) / (b1 + b2), rel=1e-12)
    # normalised: the common scale of (β1, β2) has no effect, value or gradient in (β1, β2)
    for c in (1e-3, 7.0):
        bb = torch.tensor([c * b1, c * b2], dtype=torch.float64, requires_grad=True)
        scaled = distillation_loss(
            s, y, t, beta1=bb[0], beta2=bb[1], temperature=T, normalize_weights=True
        )
        assert scaled.item() == pytest.approx(norm.item(), rel=1e-12)
        (g,) = torch.autograd.grad(scaled, bb)
        assert float(g @ bb) == pytest.approx(0.0, abs=1e-12)  # d/dc L(c·β) = ∇L · β = 0
    assert cross_entropy(s, y).item() == pytest.approx(ref_hard, rel=1e-12)
    # stable for extreme logits and tiny temperatures
    big = distillation_loss(s * 1e4, y, t * 1e4, beta1=1.0, beta2=1.0, temperature=0.1)
    assert torch.isfinite(big)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(s, y, t[:, :3], beta1=1, beta2=1, temperature=1)
    assert accuracy(s, s.argmax(1)) == 1.0


@pytest.mark.parametrize(
    "spec",
    [
        MetaParamSpec(constraint="sigmoid", lo=0.1, hi=10.0),
        MetaParamSpec(constraint="softplus", lo=0.5),
        MetaParamSpec(constraint="exp"),
        MetaParamSpec(constraint="identity"),
    ],
    ids=lambda s: s.constraint,
)
def test_constraints_round_trip_and_ranges(spec):
    raw = torch.linspace(-6, 6, 13, dtype=torch.float64)
    v = constrain(raw, spec)
    torch.testing.assert_close(unconstrain(v, spec), raw, rtol=1e-9, atol=1e-9)
    if spec.constraint == "sigmoid":
        assert bool(((v > 0.1) & (v < 10.0)).all())
    if spec.constraint in ("softplus", "exp"):
        assert bool((v > (spec.lo if spec.constraint == "softplus" else 0)).all())


def test_metaparams_init_values_and_gradients():
    specs = {
        "beta1": MetaParamSpec(init_range=(-1.0, 1.0)),
        "temperature": MetaParamSpec(lo=0.1, hi=10.0, init=2.0),
        "class_w": MetaParamSpec(constraint="exp", shape=[3], init_range=(0.0, 0.0)),
    }
    a = MetaParams(specs, generator=torch.Generator().manual_seed(1))
    b = MetaParams(specs, generator=torch.Generator().manual_seed(1))
    assert a.raw_values() == b.raw_values()  # seeded
    assert -1.0 <= a.raw_values()["beta1"] <= 1.0
    assert a.values()["temperature"] == pytest.approx(2.0, rel=1e-6)
    assert a.values()["class_w"] == pytest.approx([1.0, 1.0, 1.0])
    lam = a.constrained()
    (lam["temperature"] * 2 + lam["class_w"].sum()).backward()
    t_raw = a.raw["temperature"].detach()
    expected = 2 * 9.9 * torch.sigmoid(t_raw) * (1 - torch.sigmoid(t_raw))
    torch.testing.assert_close(a.raw["temperature"].grad, expected)
    a.set_values({"beta1": 0.25})
    assert a.values()["beta1"] == pytest.approx(0.25, rel=1e-6)
    with torch.no_grad():
        a.raw["beta1"].fill_(float("nan"))
    a.clamp_()
    assert math.isfinite(a.raw_values()["beta1"])
    with pytest.raises(KeyError, match="unknown metaparameter"):
        a.set_values({"nope": 1.0})
    with pytest.raises(ValueError, match="outside the open range"):
        a.set_values({"beta1": 1.5})


def test_list_init_gives_one_value_per_entry_row_major():
    """A list ``init`` is each entry's constrained value (row-major); its checks name shape and range."""
    values = [[0.1, 0.2, 0.3], [0.7, 0.8, 0.9]]
    spec = MetaParamSpec(shape=[2, 3], init=[v for row in values for v in row])
    got = MetaParams({"w": spec}).constrained()["w"]
    # float32 storage of the raw entries: σ(float32(logit v)) is v within a few float32 ulps
    torch.testing.assert_close(got, torch.tensor(values), rtol=0, atol=4 * 2**-24)
    with pytest.raises(ValueError, match="takes one number or 6"):
        MetaParamSpec(shape=[2, 3], init=[0.5] * 5)
    with pytest.raises(ValueError, match="a scalar or per-sample metaparameter takes one number"):
        MetaParamSpec(init=[0.5])
    with pytest.raises(ValueError, match="a scalar or per-sample metaparameter takes one number"):
        MetaParamSpec(per_sample=True, init=[0.5, 0.5])
    with pytest.raises(ValueError, match="outside the open range"):
        MetaParamSpec(shape=[2], init=[0.5, 1.0])
