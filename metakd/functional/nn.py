"""A functional view of a real ``nn.Module`` for unrolled (hypergradient) steps.

``FunctionalModel(module)(params, x)`` runs ``module`` with the parameter tensors ``params`` through
``torch.func.functional_call``; nothing is monkeypatched and the module itself is never modified.

Buffers (BatchNorm):
- in train mode the unrolled forward normalises with batch statistics, exactly like a real training step,
  but BatchNorm's running statistics are passed as ``None``, so an unroll leaves no extra updates behind
  and ``jvp``/``vmap`` never see an in-place buffer update; only the real optimiser step on the module
  (ordinary ``module(x)`` in train mode) updates them, once per step, as in ordinary training;
- in eval mode the module's current buffers are read (detached) and not written.
Other buffers are passed as detached clones, so in-place writes to them cannot leak out of an unroll.

Double backward of BatchNorm (the reverse hypergradient engine's hot spot on CPU):
differentiating ``∇_w L_train`` again sends the adjoint through every BatchNorm *backward*, and
PyTorch's generic ``batchnorm_double_backward`` runs 31 elementwise ops over full-size activations per
layer and unrolled step of the CIFAR student (``benchmarks/profile_batchnorm.py``); replacing it saves
15-25 % of a CPU hypergradient (``metakd bench``, ``reverse/stockbn``). :func:`batch_norm_train` is the same
training-mode BatchNorm (batch statistics, native kernels forward and backward) whose backward is
itself a function with a closed-form vector-Jacobian product, 9 such ops (formulas in
``_BatchNormTrainBackward``; checked by ``gradgradcheck`` in the tests). Inside
:func:`double_backward_batchnorm` (the reverse engine and the tangent step enter it), train-mode
:class:`FunctionalModel` calls route ``F.batch_norm`` through it, and so do the losses the engines
evaluate (:class:`BatchNormRouter`: any model, e.g. a plain ``torch.func.functional_call``, running
statistics updated as by the stock call); everywhere else (real steps, eval, ``torch.func`` transforms)
the stock kernels run.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

__all__ = ["BatchNormRouter", "FunctionalModel", "batch_norm_train", "double_backward_batchnorm"]

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


class FunctionalModel:
    """Stateless calls of ``module``: ``logits = fmodel(params, x)``; ``params`` as ``named_parameters``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._bn_buffers: set[str] = set()
        for mod_name, mod in module.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                prefix = f"{mod_name}." if mod_name else ""
                self._bn_buffers.update(prefix + b for b in _BN_STATS)

    def params(self) -> dict[str, Tensor]:
        """Detached copies of the module's current parameters (w0 of an unroll)."""
        return {k: v.detach().clone() for k, v in self.module.named_parameters()}

    def buffers(self) -> dict[str, Tensor | None]:
        """The buffers an unrolled call uses (see the module docstring); inside
        :meth:`real_statistics` the module's own BatchNorm buffers (updated as by ``module(x)``)."""
        training = self.module.training
        real = _REAL_STATS.get() is self
        out: dict[str, Tensor | None] = {}
        for name, buf in self.module.named_buffers():
            if name in self._bn_buffers:
                if real:
                    out[name] = buf
                else:
                    out[name] = None if training else buf.detach()
            else:
                out[name] = buf if real else buf.detach().clone()
        return out

    @contextlib.contextmanager
    def real_statistics(self) -> Iterator[None]:
        """Within the block, this model's calls read and update the module's own buffers (BatchNorm
        running statistics, ``num_batches_tracked``) exactly as a real ``module(x)`` call does: for a
        functional forward that also serves as the real training step's (the online mode's fused
        step). Call it once per real step."""
        token = _REAL_STATS.set(self)
        try:
            yield
        finally:
            _REAL_STATS.reset(token)

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        # (None buffers are accepted by functional_call; its annotation says Tensor); a module without
        # buffers skips building their dict
        has_buffers = next(self.module.buffers(), None) is not None
        tensors: dict[str, Any] = {**self.buffers(), **params} if has_buffers else dict(params)
        if self._bn_buffers and self.module.training and _DOUBLE_BACKWARD_BN.get() is True:
            with _BatchNormTrainMode():
                return functional_call(self.module, tensors, (x,), strict=False)
        return functional_call(self.module, tensors, (x,), strict=False)

    @torch.no_grad()
    def load_params(self, params: Mapping[str, Tensor]) -> None:
        """Copy ``params`` into the module's parameters (e.g. to adopt w_η)."""
        own = dict(self.module.named_parameters())
        for k, v in params.items():
            own[k].copy_(v)


# --------------------------------------------------------------------------- BatchNorm double backward

# the FunctionalModel whose calls use the module's real buffers (FunctionalModel.real_statistics)
_REAL_STATS: ContextVar[FunctionalModel | None] = ContextVar("metakd_real_stats", default=None)

#: Devices where :func:`double_backward_batchnorm` swaps in :func:`batch_norm_train`: measured faster on
#: CPU (docs/benchmarks.md); CUDA keeps cuDNN's kernels until the GPU bench has measured the swap.
FAST_BN_DEVICES: set[str] = {"cpu"}
# None: nobody chose (stock BatchNorm); True/False: the innermost explicit choice.
_DOUBLE_BACKWARD_BN: ContextVar[bool | None] = ContextVar("metakd_double_backward_bn", default=None)


@contextlib.contextmanager
def double_backward_batchnorm(enabled: bool = True, *, default: bool = False) -> Iterator[None]:
    """Within the block, train-mode :class:`FunctionalModel` calls use :func:`batch_norm_train`.

    Enter it around code that differentiates a gradient again (reverse-over-reverse unrolls); the
    values are the same as the stock BatchNorm's, only its double backward is cheaper.
    ``hypergradient(method="reverse")`` enters it with ``default=True``, which yields to an enclosing
    explicit choice: ``with double_backward_batchnorm(False): hypergradient(...)`` runs the stock one.
    """
    if default and _DOUBLE_BACKWARD_BN.get() is not None:
        yield
        return
    token = _DOUBLE_BACKWARD_BN.set(enabled)
    try:
        yield
    finally:
        _DOUBLE_BACKWARD_BN.reset(token)


def _channel(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel (C,) vector viewed as (1, C, 1, ...) to broadcast against ``like`` (N, C, ...)."""
    return v.view([1, -1] + [1] * (like.dim() - 2))


class _BatchNormTrain(Function):
    """y = γ·x̂ + β, x̂ = (x - μ)·r, μ and r = (σ² + ε)^-1/2 the per-channel batch statistics; running
    statistics, when given, are updated in place by the same native kernel as the stock BatchNorm's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
    ) -> Tensor:
        y, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormTrainBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        need = ctx.needs_input_grad
        return gx, (gw if need[1] else None), (gb if need[2] else None), None, None, None, None


def _will_use(ctx: Any, i: int) -> bool:
    """Whether this backward pass uses input ``i``'s gradient: ``needs_input_grad`` only says it
    requires grad; the engine's own pruning also knows, e.g., that the first unrolled step's
    activations (functions of w0 alone) are not on a path to λ, which skips the largest term there."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        node = ctx.next_functions[i][0]
        return node is not None and bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # a private API: fall back to needs_input_grad
        return True


class _BatchNormTrainBackward(Function):
    """(gy, x, γ) -> (gx, gγ, gβ) of BatchNorm in training mode, with a closed-form backward.

    Per channel (M elements; means over them written ⟨·⟩): gβ = Σ gy, gγ = Σ gy·x̂ and
    gx = γ·r·P(gy), where P(v) = v - ⟨v⟩ - x̂·⟨v·x̂⟩ (the projection that removes span{1, x̂}).
    With upstream adjoints (a, b, c) of (gx, gγ, gβ) and S/M = ⟨a·gy⟩ - ⟨a⟩⟨gy⟩ - ⟨a·x̂⟩⟨gy·x̂⟩:

        ∂/∂gy = γ·r·P(a) + b·x̂ + c
        ∂/∂γ  = r·S
        ∂/∂x  = -γ·r²·(x̂·S/M + ⟨gy·x̂⟩·P(a) + ⟨a·x̂⟩·P(gy)) + b·r·P(gy)

    Each output is one ``addcmul`` chain per full-size input tensor: 9 elementwise ops over the
    activation per layer and unrolled step, where the generic formula runs 31
    (``benchmarks/profile_batchnorm.py``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        gy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        return gx, gw, gb

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, a: Tensor | None, b: Tensor | None, c: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        gy, x, weight, mean, invstd, gw, gb = ctx.saved_tensors
        need_gy, need_x, need_w = (_will_use(ctx, i) for i in range(3))
        dims = [0, *range(2, x.dim())]
        m = x.numel() // x.shape[1]
        r = invstd
        gamma = weight if weight is not None else torch.ones_like(r)
        xhat = torch.addcmul(_channel(-mean * r, x), x, _channel(r, x))
        gy_mean, gy_xhat = gb / m, gw / m  # ⟨gy⟩, ⟨gy·x̂⟩ from the forward's own reductions
        zero = torch.zeros_like(r)
        if a is not None:
            a_mean = a.mean(dims)
            a_xhat = (a * xhat).mean(dims)
            s_m = (a * gy).mean(dims) - a_mean * gy_mean - a_xhat * gy_xhat
        else:
            a_mean = a_xhat = s_m = zero
        bb = b if b is not None else zero
        cc = c if c is not None else zero
        gr = gamma * r
        gr2 = gr * r
        d_gy = d_x = d_w = None
        if need_gy:
            d_gy = torch.addcmul(_channel(cc - gr * a_mean, x), xhat, _channel(bb - gr * a_xhat, x))
            if a is not None:
                d_gy = torch.addcmul(d_gy, a, _channel(gr, x))
        if need_x:
            k_gy = bb * r - gr2 * a_xhat
            k_xhat = 2 * gr2 * gy_xhat * a_xhat - gr2 * s_m - bb * r * gy_xhat
            k_one = gr2 * (gy_xhat * a_mean + a_xhat * gy_mean) - bb * r * gy_mean
            d_x = torch.addcmul(_channel(k_one, x), xhat, _channel(k_xhat, x))
            d_x = torch.addcmul(d_x, gy, _channel(k_gy, x))
            if a is not None:
                d_x = torch.addcmul(d_x, a, _channel(-gr2 * gy_xhat, x))
        if need_w and weight is not None:
            d_w = r * s_m * m
        return d_gy, d_x, d_w, None, None, None


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
) -> Tensor:
    """Training-mode BatchNorm over (N, C, ...) with batch statistics: y = γ·(x - μ)/sqrt(σ² + ε) + β.

    Equal to ``F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
    momentum=momentum, eps=eps)`` (same kernels; running statistics, when given, updated in place as
    there) but its backward is differentiable with a closed-form vector-Jacobian product
    (``_BatchNormTrainBackward``), which makes reverse-over-reverse hypergradients through BatchNorm
    layers cheaper. Not for ``torch.func`` transforms (forward mode keeps the stock BatchNorm).
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm_train expects (N, C, ...) input, got shape {tuple(x.shape)}")
    out = _BatchNormTrain.apply(x, weight, bias, eps, running_mean, running_var, momentum)
    return out  # type: ignore[no-any-return]


def _functorch_wrapped(x: Tensor) -> bool:
    """True inside ``torch.func`` transforms (vmap/grad/jvp of the user's loss): keep the stock
    BatchNorm there, which those transforms know how to handle."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # a private API: assume wrapped, i.e. take the safe stock path
        return True


class _BatchNormTrainMode(TorchFunctionMode):
    """Routes ``F.batch_norm(training=True)`` to :func:`batch_norm_train` (only float32/float64 inputs
    on :data:`FAST_BN_DEVICES`; running statistics, when passed, are updated as by the stock call);
    every other call runs unchanged. ``seen`` records whether a call was routed."""

    seen = False

    _ARGS = (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    )

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = {**dict(zip(self._ARGS, args)), **kwargs}
            x = a["input"]
            rm, rv = a.get("running_mean"), a.get("running_var")
            if (
                a.get("training", False)
                and (rm is None) == (rv is None)
                and x.dtype in (torch.float32, torch.float64)
                and x.device.type in FAST_BN_DEVICES
                and not _functorch_wrapped(x)
                and _DOUBLE_BACKWARD_BN.get() is True
            ):
                self.seen = True
                momentum = a.get("momentum", 0.1)
                return batch_norm_train(
                    x, a.get("weight"), a.get("bias"), a.get("eps", 1e-5), running_mean=rm,
                    running_var=rv, momentum=0.0 if momentum is None else momentum,
                )  # fmt: skip
        return func(*args, **kwargs)


class BatchNormRouter:
    """Makes the closed-form BatchNorm double backward reach *any* model a loss evaluates inside a
    hypergradient engine, not only :class:`FunctionalModel` (e.g. a user's
    ``torch.func.functional_call`` of an ``nn.Sequential``, or a module called directly).

    ``router.wrap(loss)`` returns the loss evaluated under a mode that routes train-mode
    ``F.batch_norm`` to :func:`batch_norm_train` (values and running statistics as the stock call;
    only inside :func:`double_backward_batchnorm` set True). A torch-function mode costs Python time on
    every op (2.5 → 6 µs per op on this project's CPU), so the first call of a router probes: when it
    met no BatchNorm outside a :class:`FunctionalModel` (which routes its own), the router's later
    calls run without the mode, and the first loss it wraps remembers that (weakly, per function or
    bound method), so later engine calls with the same loss skip the probe too. Values are the
    same either way; only the speed of BatchNorm's double backward differs.
    """

    def __init__(self) -> None:
        self.enabled = _DOUBLE_BACKWARD_BN.get() is True
        self.keep: bool | None = None  # None: not probed yet
        self._first: tuple[Any, Any] | None = None

    def wrap(self, fn: Any) -> Any:
        """``fn`` (any callable) with train-mode BatchNorm routed as described above."""
        if not self.enabled:
            return fn
        owner, key = _probe_key(fn)
        if self._first is None:
            self._first = (owner, key)
            if self.keep is None and owner is not None:
                self.keep = _PROBED.get(owner, {}).get(key)

        def routed(*args: Any, **kwargs: Any) -> Any:
            if self.keep is False:
                return fn(*args, **kwargs)
            mode = _BatchNormTrainMode()
            with mode:
                out = fn(*args, **kwargs)
            if self.keep is None:
                self.keep = mode.seen
                first_owner, first_key = self._first or (None, None)
                if first_owner is not None:
                    _PROBED.setdefault(first_owner, {})[first_key] = mode.seen
            return out

        return routed


# probe results of BatchNormRouter: {function or bound method's object: {function or None: met BN}}
_PROBED: weakref.WeakKeyDictionary[Any, dict[Any, bool]] = weakref.WeakKeyDictionary()


def _probe_key(fn: Any) -> tuple[Any, Any]:
    """(weakly referenceable, hashable owner, key) of a callable for :data:`_PROBED`; (None, None)
    when there is none (e.g. a bound method of an unhashable dataclass: probed on every call)."""
    owner, key = (fn.__self__, fn.__func__) if hasattr(fn, "__func__") else (fn, None)
    try:
        weakref.ref(owner)
        hash(owner)
    except TypeError:
        return None, None
    return owner, key
