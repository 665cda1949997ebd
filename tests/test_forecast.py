"""Forecasters on closed-form trajectories, against numpy references, and the plug-in registry."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from metakd.training import forecast
from metakd.training.forecast import (
    EmaForecaster,
    Forecaster,
    LastForecaster,
    LinearForecaster,
    NotFittedError,
    PolyForecaster,
    SklearnForecaster,
    SplineForecaster,
    available,
    forecast_error,
    get,
    register,
)

TESTS = Path(__file__).parent
ROOT = TESTS.parent
AHEAD = torch.tensor([20.0, 25.0, 40.0])  # extrapolation steps beyond the fitted 0..19


def line(s: torch.Tensor) -> torch.Tensor:
    """Three columns: rising, falling, constant. (n,) -> (n, 3)."""
    return torch.stack([0.5 * s - 1.0, -2.0 * s + 3.0, torch.full_like(s, 0.25)], dim=1)


def builtins() -> dict[str, Forecaster]:
    return {
        "linear": LinearForecaster(),
        "poly1": PolyForecaster(degree=1),
        "poly3": PolyForecaster(degree=3),
        "spline0": SplineForecaster(knots=0),
        "spline3": SplineForecaster(knots=3),
        "ema": EmaForecaster(alpha=0.3, beta=0.2),
        "ridge": SklearnForecaster("sklearn.linear_model.Ridge", alpha=1e-10),
        "last": LastForecaster(),
    }


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the test its own copy of the registry, so names it registers do not leak."""
    monkeypatch.setattr(forecast, "_REGISTRY", dict(forecast._REGISTRY))


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("name", ["linear", "poly1", "poly3", "spline0", "spline3", "ema", "ridge"])
def test_line_is_recovered_and_extrapolated(name: str) -> None:
    s = torch.arange(20.0)
    f = builtins()[name].fit(s, line(s))
    torch.testing.assert_close(f.predict(s), line(s), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.predict(AHEAD), line(AHEAD), atol=1e-5, rtol=0)


def test_quadratic_is_recovered_by_poly2_but_not_by_a_line() -> None:
    s = torch.arange(20.0, dtype=torch.float64)
    quad = torch.stack([0.1 * s**2 - s + 2, -0.05 * s**2, s**2 / 400], dim=1)
    ahead = AHEAD.double()
    truth = torch.stack([0.1 * ahead**2 - ahead + 2, -0.05 * ahead**2, ahead**2 / 400], dim=1)
    pred = PolyForecaster(degree=2).fit(s, quad).predict(ahead)
    torch.testing.assert_close(pred, truth, atol=1e-5, rtol=0)
    assert (LinearForecaster().fit(s, quad).predict(ahead) - truth).abs().max() > 1.0


def kinked(s: torch.Tensor) -> torch.Tensor:
    """Slope 1 up to step 10, then slope -2 (column 0) / 3 (column 1); continuous at 10."""
    after = (s - 10).clamp(min=0)
    return torch.stack([s - 3 * after, s + 2 * after], dim=1)


@pytest.mark.parametrize(
    "spline",
    [SplineForecaster(knots=1), SplineForecaster(knot_steps=[10.0])],
    ids=["even", "explicit"],
)
def test_spline_follows_a_kink_and_extrapolates_the_last_slope(spline: SplineForecaster) -> None:
    s = torch.arange(21.0)  # fitted range [0, 20]: one even interior knot lands on 10
    pred = spline.fit(s, kinked(s)).predict(torch.tensor([20.0, 30.0]))
    torch.testing.assert_close(pred, kinked(torch.tensor([20.0, 30.0])), atol=1e-5, rtol=0)
    slope = pred[1] - pred[0]
    torch.testing.assert_close(slope, torch.tensor([-20.0, 30.0]), atol=1e-5, rtol=0)
    linear = LinearForecaster().fit(s, kinked(s)).predict(torch.tensor([30.0]))
    assert (linear - kinked(torch.tensor([30.0]))).abs().min() > 5.0


def test_linear_poly_spline_match_numpy_least_squares_on_noisy_data() -> None:
    rng = np.random.default_rng(0)
    s = np.arange(30.0)
    v = np.stack([np.sin(s / 5), np.cos(s / 7)], axis=1) + 0.1 * rng.standard_normal((30, 2))
    ahead = np.array([30.0, 35.0])
    st, vt, at = torch.tensor(s), torch.tensor(v), torch.tensor(ahead)
    for deg, f in [(1, LinearForecaster()), (1, PolyForecaster(1)), (3, PolyForecaster(3))]:
        ref = np.stack([np.polyval(np.polyfit(s, v[:, j], deg), ahead) for j in range(2)], 1)
        np.testing.assert_allclose(f.fit(st, vt).predict(at).numpy(), ref, atol=1e-8)
    knots = [7.0, 15.0, 22.0]
    basis = lambda x: np.column_stack([np.ones_like(x), x, *[np.maximum(x - k, 0) for k in knots]])  # noqa: E731
    coef = np.linalg.lstsq(basis(s), v, rcond=None)[0]
    pred = SplineForecaster(knot_steps=knots).fit(st, vt).predict(at)
    np.testing.assert_allclose(pred.numpy(), basis(ahead) @ coef, atol=1e-8)


def test_last_holds_the_value_at_the_latest_step() -> None:
    s = torch.tensor([3.0, 9.0, 1.0])  # unsorted on purpose: "last" means the largest step
    v = torch.tensor([[1.0, 2.0], [5.0, 6.0], [7.0, 8.0]])
    pred = LastForecaster().fit(s, v).predict(torch.tensor([10.0, 100.0]))
    torch.testing.assert_close(pred, torch.tensor([[5.0, 6.0], [5.0, 6.0]]))


def test_ema_converges_to_the_new_line_after_a_kink() -> None:
    errors = []
    for n_after in (5, 20, 80):
        s = torch.arange(10.0 + n_after + 1)
        v = kinked(s)
        pred = EmaForecaster(alpha=0.5, beta=0.3).fit(s, v).predict(s[-1:] + 10)
        errors.append(float((pred - kinked(s[-1:] + 10)).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5


def test_ema_rejects_bad_smoothing() -> None:
    with pytest.raises(ValueError, match="alpha"):
        EmaForecaster(alpha=0.0)


def test_one_point_gives_a_constant() -> None:
    s, v = torch.tensor([4.0]), torch.tensor([[1.5, -2.0, 0.0]])
    for f in builtins().values():
        if isinstance(f, SklearnForecaster):
            continue  # a regressor on one point is up to the regressor
        pred = f.fit(s, v).predict(torch.tensor([4.0, 5.0, 50.0]))
        torch.testing.assert_close(pred, v.expand(3, -1), atol=1e-6, rtol=0)


def test_spline_drops_knots_it_cannot_determine() -> None:
    s = torch.tensor([0.0, 1.0])  # two points, three requested knots: a line remains
    pred = SplineForecaster(knots=3).fit(s, line(s)).predict(AHEAD)
    torch.testing.assert_close(pred, line(AHEAD), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- sklearn adapter


def test_sklearn_adapter_round_trips_paths_and_instances() -> None:
    from sklearn.linear_model import LinearRegression, Ridge

    s = torch.arange(20.0)
    for f in [
        SklearnForecaster("sklearn.linear_model:Ridge", alpha=1e-10),
        SklearnForecaster(LinearRegression()),
        SklearnForecaster(Ridge(alpha=5.0), alpha=1e-10),  # kwargs reach set_params
        SklearnForecaster("sklearn.linear_model.LinearRegression", multioutput=True),
        get("sklearn", estimator="sklearn.linear_model.LinearRegression"),
    ]:
        torch.testing.assert_close(f.fit(s, line(s)).predict(AHEAD), line(AHEAD), atol=1e-5, rtol=0)


def test_sklearn_adapter_rejects_non_regressors() -> None:
    with pytest.raises(ValueError, match="not a scikit-learn estimator class"):
        SklearnForecaster("collections.OrderedDict")
    with pytest.raises(ValueError, match="has no attribute 'NoSuchModel'"):
        SklearnForecaster("sklearn.linear_model.NoSuchModel")


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", list(builtins()))
def test_shapes_dtype_and_protocol(name: str) -> None:
    s = torch.arange(12.0)
    for dtype in (torch.float32, torch.float64):
        f = builtins()[name].fit(s, line(s).to(dtype))
        out = f.predict(torch.arange(12, 17))  # integer steps are fine
        assert isinstance(f, Forecaster)
        assert out.shape == (5, 3) and out.dtype == dtype and out.device == s.device
    assert builtins()[name].fit(s, line(s).long()).predict(s).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(builtins()))
def test_predictions_follow_the_device_of_the_values(name: str) -> None:
    s = torch.arange(12.0, device="cuda")
    cpu = builtins()[name].fit(s.cpu(), line(s.cpu())).predict(AHEAD)
    f = builtins()[name].fit(s, line(s))
    out = f.predict(AHEAD.cuda())
    assert out.device.type == "cuda" and f.state_dict()["like"].device.type == "cuda"
    torch.testing.assert_close(out.cpu(), cpu, atol=0, rtol=0)
    err = forecast_error(out, line(AHEAD))  # actual on the CPU is moved to the prediction
    assert err.device.type == "cuda" and err.shape == (3,)


def test_bad_inputs_raise_clear_errors() -> None:
    s = torch.arange(5.0)
    with pytest.raises(NotFittedError, match="before fit"):
        LinearForecaster().predict(s)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        LinearForecaster().fit(s, s)
    with pytest.raises(ValueError, match="1-D"):
        LinearForecaster().fit(s[:, None], line(s))
    with pytest.raises(ValueError, match="finite"):
        LinearForecaster().fit(s, line(s).index_fill(0, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        LinearForecaster().fit(s[:0], line(s)[:0])


@pytest.mark.parametrize("name", list(builtins()))
def test_state_dict_round_trip_reproduces_predictions(name: str, tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    s = torch.arange(15.0)
    v = line(s) + 0.1 * torch.randn(15, 3, generator=rng)
    fitted = builtins()[name].fit(s, v)
    torch.save(fitted.state_dict(), tmp_path / "f.pt")
    fresh = builtins()[name]
    assert fresh.state_dict() == {}
    fresh.load_state_dict(torch.load(tmp_path / "f.pt", weights_only=True))
    torch.testing.assert_close(fresh.predict(AHEAD), fitted.predict(AHEAD), atol=0, rtol=0)
    if name != "ridge":  # the sklearn adapter refits on load, so it keeps its history
        assert sum(t.numel() for t in fitted.state_dict().values()) < 15 * 3
    fresh.load_state_dict({})
    with pytest.raises(NotFittedError):
        fresh.predict(AHEAD)


def test_forecast_error_is_mean_absolute_error_per_column() -> None:
    rng = np.random.default_rng(1)
    p, a = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    err = forecast_error(torch.tensor(p), torch.tensor(a))
    np.testing.assert_allclose(err.numpy(), [np.mean(np.abs(p[:, j] - a[:, j])) for j in range(3)])
    with pytest.raises(ValueError, match="one shape"):
        forecast_error(torch.zeros(6, 3), torch.zeros(5, 3))


# --------------------------------------------------------------------------- registry


def test_available_lists_the_builtins() -> None:
    names = {"linear", "spline", "poly", "last", "ema", "sklearn"}
    assert {n: available()[n] for n in names} == dict.fromkeys(names, "builtin")


def test_register_refuses_duplicates_and_accepts_factories(registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("linear")(LinearForecaster)

    @register("cubic")
    def make_cubic(**kwargs: Any) -> PolyForecaster:
        return PolyForecaster(degree=3, **kwargs)

    assert available()["cubic"] == f"registered {__name__}"
    assert isinstance(get("cubic"), PolyForecaster) and get("cubic").degree == 3


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown forecaster 'splines'.*ema, last, linear"):
        get("splines")


def test_import_path_builds_a_user_class_with_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    f = get("plugins.my_forecaster:MeanForecaster", offset=1.0)
    assert type(f).__name__ == "MeanForecaster" and f.offset == 1.0
    s = torch.arange(4.0)
    torch.testing.assert_close(
        f.fit(s, line(s)).predict(AHEAD), (line(s).mean(0) + 1).expand(3, -1)
    )
    with pytest.raises(ValueError, match="rejects kwargs"):
        get("plugins.my_forecaster:MeanForecaster", bogus=1)
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        get("plugins.my_forecaster:Missing")
    with pytest.raises(ValueError, match="OrderedDict, not a class with fit/predict"):
        get("collections:OrderedDict")


def test_entry_points_are_discovered_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    value = "plugins.my_forecaster:MeanForecaster"
    ep = importlib.metadata.EntryPoint(name="mean", value=value, group="metakd.forecasters")
    broken = importlib.metadata.EntryPoint(
        name="broken", value="no_such_pkg:X", group="metakd.forecasters"
    )
    monkeypatch.setattr(forecast, "_entry_points", lambda: [ep, broken])
    assert available()["mean"] == f"entry point {value}"
    assert get("mean", offset=2.0).offset == 2.0
    with pytest.raises(ValueError, match="failed to load"):
        get("broken")


def test_docs_example_runs(registry: None) -> None:
    text = (ROOT / "docs" / "forecasting.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None, "docs/forecasting.md lost its python example"
    exec(compile(code.group(1), "docs/forecasting.md", "exec"), {})
    s = torch.arange(10.0)
    f = get("damped", damping=0.5).fit(s, line(s))
    last = LinearForecaster().fit(s, line(s)).predict(s[-1:])
    torch.testing.assert_close(f.predict(s[-1:]), last)  # no damping at the last fitted step
    # φ = 0.5: the slope adds up to at most one more step, φ/(1-φ) = 1
    torch.testing.assert_close(f.predict(torch.tensor([1e3])), line(torch.tensor([10.0])))
