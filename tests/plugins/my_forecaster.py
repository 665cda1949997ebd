"""A user-defined forecaster, used by the tests through ``"plugins.my_forecaster:MeanForecaster"``.

It follows the :class:`metakd.training.forecast.Forecaster` protocol without inheriting from metakd, and
counts its calls so a test can check that a trainer really used it.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor


class MeanForecaster:
    """Predict the mean of the fitted values plus ``offset``, for every step."""

    instances: ClassVar[list[MeanForecaster]] = []

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.mean: Tensor | None = None
        self.fit_calls = 0
        self.predict_calls = 0
        MeanForecaster.instances.append(self)

    def fit(self, steps: Tensor, values: Tensor) -> MeanForecaster:
        self.mean = values.mean(dim=0) + self.offset  # (d,)
        self.fit_calls += 1
        return self

    def predict(self, steps: Tensor) -> Tensor:
        if self.mean is None:
            raise RuntimeError("MeanForecaster.predict called before fit")
        self.predict_calls += 1
        return self.mean.expand(len(steps), -1).clone()  # (m, d)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.mean is None else {"mean": self.mean}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean = state["mean"] if state else None
