"""Benchmarks: time and peak memory of one hypergradient ∇_λ L_val(U^η(w0, λ)) per engine and η.

Every engine computes the same quantity on the same inputs: a student (``build_model``), η train batches
(x, y, teacher logits) of random tensors (teacher logits fixed, shape (B, K)), a validation batch, the
distillation loss of eq. 4 with λ = (β1, β2, T) given as raw scalars r (β = σ(r), T = 0.1 + 9.9·σ(r), the
default constraints) and plain SGD inner steps (γ = 0.1). Engines:

``plain``                         η ordinary training steps (module forward/backward, ``torch.optim.SGD``)
``metakd/reverse``                ``hypergradient(method="reverse", backend="func")`` (the default engine)
``metakd/reverse-stockbn``        the same with PyTorch's own BatchNorm double backward (what
                                  ``metakd.functional.nn.double_backward_batchnorm`` replaces; measures that gain)
``metakd/reverse-checkpoint``     the same with ``checkpoint=True``
``metakd/reverse-torchopt``       metakd's ``backend="torchopt"``
``metakd/reverse-higher``         metakd's ``backend="higher"``
``metakd/forward``                ``method="forward"`` (all metaparameters in one vmapped jvp)
``metakd/finite-difference``      ``method="finite-difference"`` (η = 1 only)
``higher``                        hand-written ``higher.innerloop_ctx`` with ``torch.optim.SGD``
``torchopt``                      hand-written ``torchopt.sgd`` + ``torch.func.functional_call`` loop

Time: one warm-up call per engine (at the smallest η: every η uses the same tensor shapes), then
``repeats`` calls per (η, engine), interleaved round-robin over engines so that a change in machine
load hits all engines alike; median wall time (CUDA synchronised) and median process CPU time.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call (reset
per call, max over the calls); on CPU each case runs once more in a fresh process forked from a server
process that never runs torch ops (after a warm-up call on a batch of 2 for lazy imports): the peak
resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
resident set size just before the call, or ``ru_maxrss`` minus it where ``/proc`` is unavailable.

:func:`run_epoch_bench` times one training epoch through :class:`metakd.training.trainer.Trainer` on the CIFAR
protocol's shape (79 batches of 128 random 3x32x32 images, cached random teacher logits) for the
``baseline``, ``hypergrad`` (η = 1 every step) and ``forecast`` (n = 2, window 10) methods.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metakd import __version__
from metakd.config import ConfigError, MetaConfig, ModelConfig
from metakd.data.models import build_model
from metakd.functional import optim
from metakd.functional.losses import cross_entropy, distillation_loss
from metakd.functional.metaparams import constrain
from metakd.functional.nn import FAST_BN_DEVICES, FunctionalModel, double_backward_batchnorm
from metakd.hypergrad import hypergradient

__all__ = ["ENGINES", "EXTERNAL_ENGINES", "run_bench", "run_epoch_bench"]

ENGINES = (
    "plain",
    "metakd/reverse",
    "metakd/reverse-fcall",
    "metakd/reverse-stockbn",
    "metakd/reverse-checkpoint",
    "metakd/reverse-torchopt",
    "metakd/reverse-higher",
    "metakd/forward",
    "metakd/finite-difference",
    "higher",
    "torchopt",
)
#: engines built on the external libraries: skipped on CPU above ``external_max_eta`` by default
EXTERNAL_ENGINES = ("metakd/reverse-torchopt", "metakd/reverse-higher", "higher", "torchopt")
INNER_LR = 0.1
NUM_CLASSES = 10
_RAW0 = {"beta1": 0.3, "beta2": -0.5, "temperature": -1.2}
_MIB = 2.0**20


# --------------------------------------------------------------------------- one case


def _input_shape(model: str) -> tuple[int, ...]:
    """(3, 32, 32) for the CIFAR models; a small vector input (32,) for ``mlp``/``logreg``."""
    return (32,) if model in ("mlp", "logreg") else (3, 32, 32)


def _distill(logits: Tensor, y: Tensor, t: Tensor, lam: dict[str, Tensor]) -> Tensor:
    """The distillation loss of eq. 4 with λ = {beta1, beta2, temperature}."""
    return distillation_loss(
        logits, y, t, beta1=lam["beta1"], beta2=lam["beta2"], temperature=lam["temperature"]
    )


@dataclass
class _Case:
    """All inputs of one hypergradient: module (train mode), batches, λ (raw leaves), w0."""

    module: nn.Module
    fmodel: FunctionalModel
    batches: list[tuple[Tensor, Tensor, Tensor]]
    val_batch: tuple[Tensor, Tensor]
    meta: dict[str, Tensor]
    params: dict[str, Tensor]
    plain_module: nn.Module

    def lam(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """λ = c(r) with the default constraints (β = σ(r), T = 0.1 + 9.9·σ(r))."""
        specs = MetaConfig().params
        return {k: constrain(v, specs[k]) for k, v in raw.items()}

    def train_loss(self, params: dict[str, Tensor], meta: dict[str, Tensor], batch: Any) -> Tensor:
        x, y, t = batch
        return _distill(self.fmodel(params, x), y, t, self.lam(meta))

    def val_loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        x, y = batch
        return cross_entropy(self.fmodel(params, x), y)


def _make_case(model: str, batch_size: int, eta: int, device: torch.device, seed: int = 0) -> _Case:
    torch.manual_seed(seed)
    shape = _input_shape(model)
    module = build_model(ModelConfig(name=model), shape, NUM_CLASSES).to(device).train()
    g = torch.Generator().manual_seed(seed + 1)

    def batch() -> tuple[Tensor, Tensor, Tensor]:
        x = torch.randn(batch_size, *shape, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        t = 2 * torch.randn(batch_size, NUM_CLASSES, generator=g)
        return x.to(device), y.to(device), t.to(device)

    batches = [batch() for _ in range(eta)]
    vx, vy, _ = batch()
    meta = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in _RAW0.items()}
    params: dict[str, Tensor] = dict(module.named_parameters())
    plain = copy.deepcopy(module)  # trained by the ``plain`` engine; the others leave w0 alone
    return _Case(module, FunctionalModel(module), batches, (vx, vy), meta, params, plain)


# --------------------------------------------------------------------------- engines

Runner = Callable[[_Case], Tensor | None]


def _metakd(**kw: Any) -> Runner:
    def run(case: _Case) -> Tensor:
        res = hypergradient(
            case.train_loss, case.val_loss, case.params, case.meta, case.batches,
            case.val_batch, optim.sgd(INNER_LR), **kw,
        )  # fmt: skip
        return torch.stack([res.grads[k] for k in case.meta])

    return run


def _metakd_fcall(case: _Case) -> Tensor:
    """``metakd/reverse`` with losses written as torchopt users do (a plain ``functional_call`` of the
    module with its own buffers, no FunctionalModel): the engine's BatchNormRouter takes the fast path."""
    from torch.func import functional_call

    def train_loss(p: dict[str, Tensor], m: dict[str, Tensor], batch: Any) -> Tensor:
        return _distill(
            functional_call(case.module, p, (batch[0],)), batch[1], batch[2], case.lam(m)
        )

    def val_loss(p: dict[str, Tensor], batch: Any) -> Tensor:
        return cross_entropy(functional_call(case.module, p, (batch[0],)), batch[1])

    res = hypergradient(
        train_loss, val_loss, case.params, case.meta, case.batches, case.val_batch,
        optim.sgd(INNER_LR),
    )  # fmt: skip
    return torch.stack([res.grads[k] for k in case.meta])


def _stock_bn(run: Runner) -> Runner:
    """``run`` with the stock BatchNorm double backward (metakd.functional.nn.double_backward_batchnorm(False))."""

    def stock(case: _Case) -> Tensor | None:
        with double_backward_batchnorm(False):
            return run(case)

    return stock


def _plain(case: _Case) -> None:
    """η real training steps on a copy of the module (made once per case)."""
    module = case.plain_module
    opt = torch.optim.SGD(module.parameters(), lr=INNER_LR)
    lam = case.lam({k: v.detach() for k, v in case.meta.items()})
    for x, y, t in case.batches:
        opt.zero_grad(set_to_none=True)
        _distill(module(x), y, t, lam).backward()
        opt.step()


def _higher(case: _Case) -> Tensor:
    """What a user writes with higher: innerloop_ctx over the module and a torch SGD optimizer."""
    import higher

    module = case.module  # copy_initial_weights: w0 is not modified
    opt = torch.optim.SGD(module.parameters(), lr=INNER_LR)
    meta = list(case.meta.values())
    with higher.innerloop_ctx(module, opt, copy_initial_weights=True) as (fmod, diffopt):
        for x, y, t in case.batches:
            diffopt.step(_distill(fmod(x), y, t, case.lam(case.meta)))
        vloss = cross_entropy(fmod(case.val_batch[0]), case.val_batch[1])
        return torch.stack(torch.autograd.grad(vloss, meta))


def _torchopt(case: _Case) -> Tensor:
    """What a user writes with torchopt's functional API: ``torchopt.sgd`` + ``functional_call``."""
    import torchopt
    from torch.func import functional_call

    module = case.module
    params = {k: v.detach().requires_grad_(True) for k, v in module.named_parameters()}
    opt = torchopt.sgd(INNER_LR)
    state = opt.init(params)
    for x, y, t in case.batches:
        logits = functional_call(module, params, (x,))
        loss = _distill(logits, y, t, case.lam(case.meta))
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
        updates, state = opt.update(dict(zip(params, grads)), state, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    vloss = cross_entropy(functional_call(module, params, (case.val_batch[0],)), case.val_batch[1])
    return torch.stack(torch.autograd.grad(vloss, list(case.meta.values())))


_RUNNERS: dict[str, Runner] = {
    "plain": _plain,
    "metakd/reverse": _metakd(method="reverse"),
    "metakd/reverse-fcall": _metakd_fcall,
    "metakd/reverse-stockbn": _stock_bn(_metakd(method="reverse")),
    "metakd/reverse-checkpoint": _metakd(method="reverse", checkpoint=True),
    "metakd/reverse-torchopt": _metakd(method="reverse", backend="torchopt"),
    "metakd/reverse-higher": _metakd(method="reverse", backend="higher"),
    "metakd/forward": _metakd(method="forward"),
    "metakd/finite-difference": _metakd(method="finite-difference"),
    "higher": _higher,
    "torchopt": _torchopt,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Runner, case: _Case, device: torch.device) -> tuple[float, float, Tensor | None]:
    """(wall seconds, process CPU seconds, result) of one call."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = run(case)
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0, out


# --------------------------------------------------------------------------- CPU peak memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _memory_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in a fresh process: warm up on tiny tensors, then (peak RSS increase MiB, seconds)."""
    try:
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        device = torch.device("cpu")
        run = _RUNNERS[spec["engine"]]
        run(_make_case(spec["model"], 2, 1, device))  # lazy imports and inits, tiny tensors
        case = _make_case(spec["model"], spec["batch_size"], spec["eta"], device)
        before = _status_kib("VmRSS")
        if before is not None and _reset_peak_rss():
            wall, _, _ = _timed(run, case, device)
            peak = _status_kib("VmHWM") or before
        else:  # no /proc: ru_maxrss (KiB on Linux) since the process started
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            wall, _, _ = _timed(run, case, device)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mem_mib": max(peak - before, 0) / 1024.0, "first_call_s": wall}
    except Exception as exc:  # reported in the results instead of killing the bench
        return {"error": f"{type(exc).__name__}: {exc}"}


def _memory_server() -> None:
    """A fork server that never runs a torch op itself (forking after OpenMP work can hang the
    child): one JSON spec per stdin line; each case runs in a forked child; one JSON line back."""
    for line in sys.stdin:
        spec = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            with os.fdopen(w, "w") as fh:
                fh.write(json.dumps(_memory_case(spec)))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        out = text or json.dumps({"error": f"memory process died (wait status {status})"})
        sys.stdout.write(out.replace("\n", " ") + "\n")
        sys.stdout.flush()


class _MemoryRunner:
    """Client of :func:`_memory_server` (a subprocess started on first use)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None:
            code = "import metakd.bench.engines as b; b._memory_server()"
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, bufsize=1,
            )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            return {"error": "memory server exited"}
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


# --------------------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _versions(device: torch.device) -> dict[str, Any]:
    import higher
    import torchopt

    env: dict[str, Any] = {
        "metakd": __version__,
        "torch": torch.__version__,
        "higher": getattr(higher, "__version__", None) or _dist_version("higher"),
        "torchopt": torchopt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        env["load_average"] = list(os.getloadavg())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'"
        )
    return dev


# --------------------------------------------------------------------------- the benchmark


def _progress(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _ratios(rows: list[dict[str, Any]], etas: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for eta in etas:
        at = {r["engine"]: r for r in rows if r["eta"] == eta}
        entry: dict[str, Any] = {"eta": eta}
        for key, suffix in (("time_s", ""), ("cpu_time_s", "_cpu")):

            def t(name: str, key: str = key, at: dict[str, Any] = at) -> float | None:
                return at[name][key] if name in at else None

            ext = [v for v in (t("higher"), t("torchopt")) if v is not None]
            rev = t("metakd/reverse")
            entry["reverse/higher" + suffix] = _ratio(rev, t("higher"))
            entry["reverse/torchopt" + suffix] = _ratio(rev, t("torchopt"))
            entry["reverse/best_external" + suffix] = _ratio(rev, min(ext) if ext else None)
            entry["fcall/best_external" + suffix] = _ratio(
                t("metakd/reverse-fcall"), min(ext) if ext else None
            )
            entry["reverse/plain" + suffix] = _ratio(rev, t("plain"))
            entry["forward/reverse" + suffix] = _ratio(t("metakd/forward"), rev)
            entry["checkpoint/reverse" + suffix] = _ratio(t("metakd/reverse-checkpoint"), rev)
            entry["reverse/stockbn" + suffix] = _ratio(rev, t("metakd/reverse-stockbn"))
        mem = {n: r.get("peak_mem_mib") for n, r in at.items()}
        entry["mem_checkpoint/reverse"] = _ratio(
            mem.get("metakd/reverse-checkpoint"), mem.get("metakd/reverse")
        )
        entry["mem_forward/reverse"] = _ratio(mem.get("metakd/forward"), mem.get("metakd/reverse"))
        out.append(entry)
    return out


def _rel_diff(a: Tensor | None, ref: Tensor | None) -> float | None:
    if a is None or ref is None:
        return None
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def run_bench(
    model: str = "cifar_very_tiny",
    batch_size: int = 128,
    device: str = "auto",
    etas: list[int] = [1, 4, 16, 64],  # noqa: B006 (never mutated)
    repeats: int = 3,
    out: Path | None = None,
    engines: list[str] | None = None,
    *,
    threads: int | None = None,
    external_max_eta: int | None = 16,
    memory: bool = True,
    plot_path: Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Time (median of ``repeats``) and peak memory of one hypergradient per engine and η.

    Args:
        model: a registered model (input (3, 32, 32), 10 classes; ``mlp``/``logreg`` take (32,)).
        batch_size: B of every train and validation batch.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        etas: unroll lengths η.
        repeats: timed calls per (engine, η) after one warm-up per engine.
        out: directory for ``bench.json``, ``bench.md`` and ``bench.png`` (None: print only).
        engines: subset of :data:`ENGINES` (default all).
        threads: ``torch.set_num_threads`` (None keeps torch's default); reported in the JSON.
        external_max_eta: on CPU, skip the :data:`EXTERNAL_ENGINES` above this η (None: never skip).
        memory: measure peak memory (on CPU this runs each case once more in a fresh process).
        plot_path: where to write the plot (default ``out/bench.png``).
        quiet: do not print the table.

    Returns:
        ``{"config", "env", "method", "results": [row per (engine, η)], "ratios": [per η], "notes"}``;
        a row has ``engine, eta, time_s, time_min_s, cpu_time_s, times_s, peak_mem_mib, skipped,
        rel_diff_vs_reverse`` (relative difference of its hypergradient from ``metakd/reverse``).
    """
    names = list(ENGINES) if engines is None else list(engines)
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise ConfigError(f"unknown bench engines {unknown}; choose from {list(ENGINES)}")
    if not etas or min(etas) < 1:
        raise ConfigError(f"etas must be integers >= 1, got {etas}")
    if repeats < 1 or batch_size < 1:
        raise ConfigError(f"repeats and batch_size must be >= 1, got {repeats} and {batch_size}")
    dev = _resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    build_model(
        ModelConfig(name=model), _input_shape(model), NUM_CLASSES
    )  # fail early on a bad name
    etas = sorted(set(int(e) for e in etas))
    notes: list[str] = []

    def skip_reason(name: str, eta: int) -> str | None:
        if name == "metakd/finite-difference" and eta != 1:
            return "finite difference is the one-step (η = 1) approximation"
        if (
            dev.type == "cpu"
            and external_max_eta is not None
            and eta > external_max_eta
            and name in EXTERNAL_ENGINES
        ):
            return (
                f"external library skipped on CPU above η = {external_max_eta} (external_max_eta)"
            )
        return None

    cells = {(n, e): skip_reason(n, e) for n in names for e in etas}
    for (n, e), why in cells.items():
        if why and n != "metakd/finite-difference":
            notes.append(f"{n} at η = {e}: {why}")

    # Peak memory on CPU first, from a clean forkserver (before this process does any work).
    mem_cpu: dict[tuple[str, int], dict[str, Any]] = {}
    if memory and dev.type == "cpu":
        runner = _MemoryRunner()
        try:
            for e in etas:
                for n in names:
                    if cells[(n, e)] is None:
                        spec = {"model": model, "batch_size": batch_size, "eta": e, "engine": n,
                                "threads": torch.get_num_threads()}  # fmt: skip
                        _progress(quiet, f"memory  η={e:<3} {n}")
                        mem_cpu[(n, e)] = runner(spec)
        finally:
            runner.close()

    times: dict[tuple[str, int], list[tuple[float, float]]] = {k: [] for k in cells}
    grads: dict[tuple[str, int], Tensor | None] = {}
    peak_cuda: dict[tuple[str, int], float] = {}
    errors: dict[tuple[str, int], str] = {}
    warmed: set[str] = set()
    for e in etas:
        case = _make_case(model, batch_size, e, dev)
        active = [n for n in names if cells[(n, e)] is None]
        for n in active:
            if n not in warmed:  # one warm-up per engine, at its smallest η
                try:
                    _timed(_RUNNERS[n], case, dev)
                except Exception as exc:
                    errors[(n, e)] = f"{type(exc).__name__}: {exc}"
                warmed.add(n)
        for i in range(repeats):
            _progress(quiet, f"timing  η={e:<3} repeat {i + 1}/{repeats}")
            for n in active:
                if (n, e) in errors:
                    continue
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                try:
                    wall, cpu, res = _timed(_RUNNERS[n], case, dev)
                except Exception as exc:
                    errors[(n, e)] = f"{type(exc).__name__}: {exc}"
                    continue
                if dev.type == "cuda":
                    peak = (torch.cuda.max_memory_allocated(dev) - base) / _MIB
                    peak_cuda[(n, e)] = max(peak, peak_cuda.get((n, e), 0.0))
                times[(n, e)].append((wall, cpu))
                grads[(n, e)] = res
        del case

    rows: list[dict[str, Any]] = []
    for e in etas:
        ref = grads.get(("metakd/reverse", e))
        for n in names:
            ts = times[(n, e)]
            mem = mem_cpu.get((n, e), {})
            err = errors.get((n, e)) or mem.get("error")
            rows.append({
                "engine": n,
                "eta": e,
                "time_s": _median([w for w, _ in ts]),
                "time_min_s": min((w for w, _ in ts), default=None),
                "cpu_time_s": _median([c for _, c in ts]),
                "times_s": [w for w, _ in ts],
                "peak_mem_mib": peak_cuda.get((n, e), mem.get("peak_mem_mib")),
                "skipped": cells[(n, e)],
                "error": err,
                "rel_diff_vs_reverse": _rel_diff(grads.get((n, e)), ref) if n != "plain" else None,
            })  # fmt: skip

    mem_method = (
        "cuda: torch.cuda.max_memory_allocated minus memory_allocated before the call "
        "(peak stats reset per call; max over the calls), MiB"
        if dev.type == "cuda"
        else "cpu: one extra call per case in a fresh process forked from a server process that "
        "never runs torch ops "
        "(after a warm-up call with batch 2, η = 1, for lazy imports and inits); "
        "peak RSS (VmHWM after resetting it via /proc/self/clear_refs) minus RSS just before "
        "the call, MiB (ru_maxrss where /proc is unavailable)"
    )
    result: dict[str, Any] = {
        "config": {
            "model": model,
            "input_shape": list(_input_shape(model)),
            "num_classes": NUM_CLASSES,
            "num_params": sum(
                p.numel()
                for p in build_model(
                    ModelConfig(name=model), _input_shape(model), NUM_CLASSES
                ).parameters()
            ),
            "batch_size": batch_size,
            "device": str(dev),
            "etas": etas,
            "repeats": repeats,
            "engines": names,
            "threads": torch.get_num_threads(),
            "external_max_eta": external_max_eta,
            "inner_optimizer": f"sgd(lr={INNER_LR})",
            "meta_raw": dict(_RAW0),
        },
        "env": _versions(dev),
        "method": {
            "time": "one warm-up call per engine, then `repeats` calls per (η, engine) interleaved "
            "round-robin over engines; time_s = median wall seconds (CUDA synchronised), "
            "cpu_time_s = median process CPU seconds",
            "memory": mem_method if memory else "not measured",
        },
        "results": rows,
        "ratios": _ratios(rows, etas),
        "notes": notes,
    }
    if not quiet:
        _print_table(result)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "bench.md").write_text(to_markdown(result))
        _plot(result, plot_path or out / "bench.png")
    elif plot_path is not None:
        _plot(result, plot_path)
    return result


# --------------------------------------------------------------------------- output


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def to_markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables: time/memory per engine and η, then the ratios."""
    cfg, env = result["config"], result["env"]
    etas = cfg["etas"]
    lines = [
        f"model `{cfg['model']}` ({cfg['num_params']} parameters), batch {cfg['batch_size']}, "
        f"device `{cfg['device']}`"
        + (f" ({env['gpu']})" if "gpu" in env else f" ({env['cpu']}, {env['cpu_count']} cores)")
        + f", {cfg['threads']} torch thread(s), torch {env['torch']}, higher {env['higher']}, "
        f"torchopt {env['torchopt']}, median of {cfg['repeats']}",
        "",
        "Wall seconds per hypergradient (CPU seconds in parentheses); peak memory in MiB:",
        "",
        "| engine | " + " | ".join(f"η={e} time" for e in etas) + " | "
        + " | ".join(f"η={e} MiB" for e in etas) + " |",
        "|---" * (1 + 2 * len(etas)) + "|",
    ]  # fmt: skip
    by = {(r["engine"], r["eta"]): r for r in result["results"]}
    for n in cfg["engines"]:
        cells_t, cells_m = [], []
        for e in etas:
            r = by[(n, e)]
            if r["skipped"]:
                cells_t.append("skipped")
                cells_m.append("—")
            elif r["error"] and r["time_s"] is None:
                cells_t.append("error")
                cells_m.append("—")
            else:
                cells_t.append(f"{_fmt(r['time_s'])} ({_fmt(r['cpu_time_s'])})")
                cells_m.append(_fmt(r["peak_mem_mib"], ".0f"))
        lines.append(f"| {n} | " + " | ".join(cells_t + cells_m) + " |")
    keys = [
        "reverse/best_external", "fcall/best_external", "reverse/higher", "reverse/torchopt",
        "reverse/plain", "forward/reverse", "checkpoint/reverse", "reverse/stockbn",
    ]  # fmt: skip
    lines += [
        "",
        "Time ratios (wall; CPU time in parentheses), same process:",
        "",
        "| η | " + " | ".join(keys) + " | mem checkpoint/reverse | mem forward/reverse |",
        "|---" * (len(keys) + 3) + "|",
    ]
    for ent in result["ratios"]:
        cells = [f"{_fmt(ent[k], '.2f')} ({_fmt(ent[k + '_cpu'], '.2f')})" for k in keys]
        cells += [
            _fmt(ent["mem_checkpoint/reverse"], ".2f"),
            _fmt(ent["mem_forward/reverse"], ".2f"),
        ]
        lines.append(f"| {ent['eta']} | " + " | ".join(cells) + " |")
    if result["notes"]:
        lines += ["", *[f"- {n}" for n in result["notes"]]]
    errs = [r for r in result["results"] if r["error"]]
    lines += [f"- error in {r['engine']} at η = {r['eta']}: {r['error']}" for r in errs]
    return "\n".join(lines) + "\n"


def _print_table(result: dict[str, Any]) -> None:
    print(to_markdown(result), flush=True)


def _plot(result: dict[str, Any], path: Path) -> None:
    """Time and peak memory vs η per engine (log-log), matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in cfg["engines"]:
        rows = [r for r in result["results"] if r["engine"] == n and r["time_s"] is not None]
        if not rows:
            continue
        style = "-o" if n.startswith("metakd") else ("--s" if n != "plain" else ":k^")
        axes[0].plot([r["eta"] for r in rows], [r["time_s"] for r in rows], style, label=n)
        mem = [r for r in rows if r["peak_mem_mib"] is not None]
        if mem:
            axes[1].plot(
                [r["eta"] for r in mem], [max(r["peak_mem_mib"], 1e-2) for r in mem], style
            )
    dev = cfg["device"] + (f" ({result['env']['gpu']})" if "gpu" in result["env"] else "")
    for ax, ylabel in zip(axes, ("seconds per hypergradient (median)", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("η (unrolled steps)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{cfg['model']}, batch {cfg['batch_size']}, {dev}, {cfg['threads']} thread(s)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- end to end


def _synthetic_splits(
    model: str, steps: int, batch_size: int, n_eval: int, device: torch.device, seed: int = 0
) -> tuple[Any, dict[str, Tensor]]:
    from metakd.data import Split, Splits

    shape = _input_shape(model)
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.randn(n, *shape, generator=g).to(device)
        return Split(
            x=x, y=torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device), x_teacher=x
        )

    train = split(steps * batch_size)
    val, test = split(n_eval), split(n_eval)
    splits = Splits(teacher=train, train=train, val=val, test=test, num_classes=NUM_CLASSES,
                    info={"name": "bench-random", "fingerprint": f"bench-{seed}"})  # fmt: skip
    logits = {
        k: (2 * torch.randn(len(s), NUM_CLASSES, generator=g)).to(device)
        for k, s in (("train", train), ("val", val), ("test", test))
    }
    return splits, logits


def _epoch(
    method: str, model: str, splits: Any, logits: dict[str, Tensor], batch_size: int,
    device: torch.device, unroll: int = 1,
) -> dict[str, Any]:  # fmt: skip
    from metakd.config import Config, ForecastConfig, TrainConfig
    from metakd.training.trainer import Trainer

    meta = MetaConfig.model_validate(
        {"method": method, "unroll": unroll, "every": 1, "optimizer": "sgd", "lr": 1.0,
         "clip": 1.0, "val_batch_size": batch_size}
    )  # fmt: skip
    cfg = Config(
        name="epoch-bench",
        student=ModelConfig(name=model),
        train=TrainConfig(optimizer="adam", lr=1e-3, epochs=1, batch_size=batch_size, eval_every=0),
        meta=meta,
        forecast=ForecastConfig(window=10, optimize=1, predict=1, forecaster="linear"),
    )  # fmt: skip
    torch.manual_seed(0)
    student = build_model(cfg.student, _input_shape(model), NUM_CLASSES).to(device)
    trainer = Trainer(cfg, student, splits, logits, device=device)
    spent = {"data_train": 0.0, "data_meta": 0.0, "meta_update": 0.0}
    in_meta = [False]
    batch_fn, val_fn = trainer.stream.batch, trainer.stream.val_batch
    meta_step_fn, apply_fn = trainer.meta_step, trainer.apply_meta_grad

    def timed(fn: Callable[..., Any], key: Callable[[], str]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[key()] += time.perf_counter() - t0

        return wrapper

    def data_key() -> str:
        return "data_meta" if in_meta[0] else "data_train"

    def meta_step(step: int) -> Any:
        in_meta[0] = True
        try:
            return meta_step_fn(step)
        finally:
            in_meta[0] = False

    # instance attributes shadow the methods for this trainer only (timing probes)
    trainer.stream.batch = timed(batch_fn, data_key)  # type: ignore[method-assign]
    trainer.stream.val_batch = timed(val_fn, data_key)  # type: ignore[method-assign]
    trainer.apply_meta_grad = timed(apply_fn, lambda: "meta_update")  # type: ignore[method-assign]
    trainer.meta_step = meta_step  # type: ignore[method-assign]
    _sync(device)
    summary = trainer.train()
    _sync(device)
    ph = summary["phase_seconds"]
    split = {
        "data": spent["data_train"] + spent["data_meta"],
        "forward": ph["train"] - spent["data_train"],
        "hypergrad": ph["hypergrad"] - spent["data_meta"] - spent["meta_update"],
        "meta": spent["meta_update"] + ph["forecast"],
        "eval": ph["eval"],
    }
    split["other"] = summary["wall_seconds"] - sum(split.values())
    return {
        "method": method,
        "wall_s": summary["wall_seconds"],
        "wall_without_eval_s": summary["wall_seconds"] - ph["eval"],
        "split_s": split,
        "steps": summary["steps"],
        "hypergradient_steps": summary["hypergradient_steps"],
        "predicted_steps": summary["predicted_steps"],
    }


def run_epoch_bench(
    model: str = "cifar_very_tiny",
    device: str = "auto",
    methods: Sequence[str] = ("baseline", "hypergrad", "forecast"),
    *,
    steps: int = 79,
    batch_size: int = 128,
    n_eval: int = 10_000,
    threads: int | None = None,
    out: Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Wall time of one training epoch per method through :class:`metakd.training.trainer.Trainer`.

    The CIFAR protocol's shape without real data: ``steps`` batches of ``batch_size`` random inputs
    (79 x 128 ≈ the paper's 10,112 images), random cached teacher logits, validation and test splits of
    ``n_eval`` images (evaluated once, at the end of the epoch), Adam(1e-3) real steps, meta SGD(lr 1,
    clip 1), η = 1 every step (``hypergrad``) or the n = 2 forecast schedule with windows of 10 steps
    (``forecast``). Reports the wall time split into data (batch gathering), forward (real step:
    forward, backward, optimizer), hypergrad (the hypergradient), meta (meta update + forecasting),
    eval and other, and the ratios to ``baseline``. With ``out``, writes ``epoch.json``.
    """
    dev = _resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    bad = [m for m in methods if m not in ("baseline", "fixed", "random", "hypergrad", "forecast")]
    if bad:
        raise ConfigError(
            f"unknown methods {bad}; choose from baseline, fixed, random, hypergrad, forecast"
        )
    splits, logits = _synthetic_splits(model, steps, batch_size, n_eval, dev)
    small, small_logits = _synthetic_splits(model, 3, batch_size, batch_size, dev, seed=1)
    _epoch("hypergrad", model, small, small_logits, batch_size, dev)  # warm-up
    rows = []
    for m in methods:
        _progress(quiet, f"epoch   {m}")
        rows.append(_epoch(m, model, splits, logits, batch_size, dev))
    base = next((r for r in rows if r["method"] == "baseline"), None)
    for r in rows:
        r["ratio_to_baseline"] = _ratio(r["wall_s"], base["wall_s"]) if base else None
        r["ratio_to_baseline_without_eval"] = (
            _ratio(r["wall_without_eval_s"], base["wall_without_eval_s"]) if base else None
        )
    result = {
        "config": {"model": model, "device": str(dev), "steps": steps, "batch_size": batch_size,
                   "n_eval": n_eval, "threads": torch.get_num_threads(), "train": "adam(1e-3)",
                   "meta": "sgd(lr=1, clip=1), η = 1", "forecast": "window 10, optimize 1, predict 1"},
        "env": _versions(dev),
        "epochs": rows,
    }  # fmt: skip
    if not quiet:
        print(epoch_markdown(result), flush=True)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "epoch.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "epoch.md").write_text(epoch_markdown(result))
    return result


def epoch_markdown(result: dict[str, Any]) -> str:
    """The epoch benchmark as a Markdown table."""
    cfg = result["config"]
    lines = [
        f"One epoch, `{cfg['model']}`, {cfg['steps']} steps x batch {cfg['batch_size']}, "
        f"eval on 2 x {cfg['n_eval']} images, device `{cfg['device']}`, {cfg['threads']} thread(s); seconds:",
        "",
        "| method | epoch wall | data | forward | hypergrad | meta | eval | other "
        "| / baseline | / baseline without eval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["epochs"]:
        s = r["split_s"]
        lines.append(
            f"| {r['method']} | {r['wall_s']:.2f} | {s['data']:.3f} | {s['forward']:.2f} | "
            f"{s['hypergrad']:.2f} | {s['meta']:.3f} | {s['eval']:.2f} | {s['other']:.3f} | "
            f"{_fmt(r['ratio_to_baseline'], '.2f')} | {_fmt(r['ratio_to_baseline_without_eval'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- python -m metakd.bench.engines


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m metakd.bench.engines``: the hypergradient bench (and ``--e2e`` the epoch bench)."""
    p = argparse.ArgumentParser(prog="python -m metakd.bench.engines", description=main.__doc__)
    p.add_argument("--model", default="cifar_very_tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--etas", default="1,4,16,64", help="comma-separated unroll lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="directory for bench.json/.md/.png")
    p.add_argument("--plot", type=Path, default=None, help="plot path (default OUT/bench.png)")
    p.add_argument("--engines", default=None, help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--external-max-eta", type=int, default=16,
                   help="CPU: skip higher/torchopt engines above this η (0: never skip)")  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--e2e", action="store_true", help="also run the one-epoch benchmark")
    p.add_argument("--e2e-only", action="store_true", help="run only the one-epoch benchmark")
    p.add_argument("--n-eval", type=int, default=10_000, help="e2e: val/test images")
    p.add_argument("--fast-bn-devices", default=None,
                   help="device types where the reverse engine uses metakd's closed-form BatchNorm "
                        "double backward (default: metakd.functional.nn.FAST_BN_DEVICES, i.e. cpu); "
                        "e.g. cpu,cuda to measure it against metakd/reverse-stockbn on a GPU")  # fmt: skip
    a = p.parse_args(argv)
    if a.fast_bn_devices is not None:
        FAST_BN_DEVICES.clear()
        FAST_BN_DEVICES.update(d.strip() for d in a.fast_bn_devices.split(",") if d.strip())
    try:
        etas = [int(e) for e in a.etas.split(",") if e.strip()]
    except ValueError:
        p.error(f"--etas needs comma-separated integers, got {a.etas!r}")
    engines = [e.strip() for e in a.engines.split(",")] if a.engines else None
    if not a.e2e_only:
        run_bench(a.model, a.batch_size, a.device, etas, a.repeats, a.out, engines,
                  threads=a.threads, external_max_eta=a.external_max_eta or None,
                  memory=not a.no_memory, plot_path=a.plot)  # fmt: skip
    if a.e2e or a.e2e_only:
        run_epoch_bench(a.model, a.device, batch_size=a.batch_size, n_eval=a.n_eval,
                        threads=a.threads, out=a.out)  # fmt: skip


if __name__ == "__main__":
    main()
