"""Metaparameters λ: named raw tensors r (what the meta-optimizer moves) and their constrained values v = c(r).

The paper's parameterisation is ``β = sigmoid(r)`` and ``T = 0.1 + 9.9·sigmoid(r)``; here any named
metaparameter (a loss weight, a temperature, a learning rate, per-class weights of shape ``(K,)``) gets one
of four constraints:

    sigmoid   v = lo + (hi - lo)·σ(r)        v ∈ (lo, hi)
    softplus  v = lo + softplus(r)           v ∈ (lo, ∞)
    exp       v = exp(r)                     v ∈ (0, ∞)
    identity  v = r

``MetaParams.constrained()`` maps raw leaves to constrained tensors inside the autograd graph, so a loss
written in terms of v has an exact gradient w.r.t. r.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metakd.config import MetaParamSpec

__all__ = ["RAW_LIMIT", "MetaParams", "constrain", "unconstrain"]

#: |raw| is kept below this by ``clamp_``: σ(±30) is 1 - 1e-13 away from the bounds, so λ stays inside its
#: open interval in float32 and the gradient of σ does not vanish to an exact 0.
RAW_LIMIT = 30.0


def constrain(raw: Tensor, spec: MetaParamSpec) -> Tensor:
    """v = c(r) for the spec's constraint (differentiable)."""
    if spec.constraint == "sigmoid":
        return spec.lo + (spec.hi - spec.lo) * torch.sigmoid(raw)
    if spec.constraint == "softplus":
        return spec.lo + F.softplus(raw)
    if spec.constraint == "exp":
        return torch.exp(raw)
    return raw


def unconstrain(value: Tensor, spec: MetaParamSpec) -> Tensor:
    """r = c⁻¹(v); raises ValueError when v is outside the constraint's range."""
    v = value.double()
    if spec.constraint == "sigmoid":
        if not bool(((v > spec.lo) & (v < spec.hi)).all()):
            raise ValueError(
                f"value {value.tolist()} is outside the open range ({spec.lo}, {spec.hi})"
            )
        u = (v - spec.lo) / (spec.hi - spec.lo)
        r = torch.log(u) - torch.log1p(-u)
    elif spec.constraint == "softplus":
        if not bool((v > spec.lo).all()):
            raise ValueError(f"value {value.tolist()} must be > {spec.lo} (softplus constraint)")
        y = v - spec.lo
        r = y + torch.log(-torch.expm1(-y))  # inverse softplus, stable
    elif spec.constraint == "exp":
        if not bool((v > 0).all()):
            raise ValueError(f"value {value.tolist()} must be > 0 (exp constraint)")
        r = torch.log(v)
    else:
        r = v
    return r.to(value.dtype)


def _as_python(t: Tensor) -> float | list[Any]:
    t = t.detach().cpu()
    return t.item() if t.dim() == 0 else t.tolist()


class MetaParams:
    """A named set of metaparameters: ``raw[name]`` are leaf tensors (``requires_grad=True``).

    Initial raw values: ``c⁻¹(spec.init)`` when ``spec.init`` is given (a number for every entry, or a
    row-major list of one per entry), else ``U(init_range)`` drawn from
    ``generator`` (seeded, so runs are reproducible). Shapes come from ``spec.shape`` (``[]`` = scalar).
    """

    def __init__(
        self,
        specs: Mapping[str, MetaParamSpec],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not specs:
            raise ValueError("MetaParams needs at least one metaparameter spec")
        self.specs: dict[str, MetaParamSpec] = dict(specs)
        self.raw: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            shape = tuple(spec.shape)
            if isinstance(spec.init, list):  # one constrained value per entry, row-major
                r = unconstrain(torch.tensor(spec.init, dtype=torch.float64).reshape(shape), spec)
            elif spec.init is not None:
                r = unconstrain(torch.full(shape, float(spec.init), dtype=torch.float64), spec)
            else:
                lo, hi = spec.init_range
                r = lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)
            self.raw[name] = r.to(device=device, dtype=dtype).requires_grad_(True)

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def parameters(self) -> list[Tensor]:
        """The raw leaves, in name order (give these to a torch meta-optimizer)."""
        return list(self.raw.values())

    def constrained(self, raw: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """{name: c(r)}, differentiable w.r.t. ``raw`` (default: this container's leaves)."""
        raw = self.raw if raw is None else raw
        missing = set(self.specs) - set(raw)
        if missing:
            raise KeyError(
                f"raw metaparameters {sorted(missing)} are missing; expected {self.names}"
            )
        return {name: constrain(raw[name], spec) for name, spec in self.specs.items()}

    def values(self) -> dict[str, float | list[Any]]:
        """Constrained values as Python numbers (lists for tensor metaparameters; a per-sample one, N
        entries, as its mean over the examples)."""
        with torch.no_grad():
            return {k: self._python(k, v) for k, v in self.constrained().items()}

    def raw_values(self) -> dict[str, float | list[Any]]:
        return {k: self._python(k, v) for k, v in self.raw.items()}

    def _python(self, name: str, v: Tensor) -> float | list[Any]:
        return _as_python(v.double().mean() if self.specs[name].per_sample else v)

    @torch.no_grad()
    def set_values(self, values: Mapping[str, float | Sequence[float] | Tensor]) -> None:
        """Set raw values from constrained ones (r = c⁻¹(v)); unknown names raise KeyError."""
        for name, value in values.items():
            if name not in self.specs:
                raise KeyError(f"unknown metaparameter {name!r}; known: {self.names}")
            target = self.raw[name]
            v = torch.as_tensor(value, dtype=torch.float64).expand(target.shape)
            target.copy_(unconstrain(v, self.specs[name]))

    @torch.no_grad()
    def set_raw(self, raw: Mapping[str, Tensor | float]) -> None:
        for name, value in raw.items():
            self.raw[name].copy_(torch.as_tensor(value).expand(self.raw[name].shape))

    @torch.no_grad()
    def clamp_(self, limit: float = RAW_LIMIT) -> None:
        """Keep raw values finite and |r| <= limit (identity constraints are left free but finite)."""
        for name, r in self.raw.items():
            spec = self.specs[name]
            bound = limit if spec.constraint != "identity" else math.inf
            torch.nan_to_num_(r, nan=0.0, posinf=limit, neginf=-limit)
            if math.isfinite(bound):
                r.clamp_(-bound, bound)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.raw.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = set(self.specs) - set(state)
        if missing:
            raise KeyError(f"state has no values for metaparameters {sorted(missing)}")
        self.set_raw({k: state[k] for k in self.specs})

    def to(self, device: torch.device | str) -> MetaParams:
        for name in list(self.raw):
            self.raw[name] = self.raw[name].detach().to(device).requires_grad_(True)
        return self

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={v}" for k, v in self.values().items())
        return f"MetaParams({vals})"
