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

:func:`run_epoch_bench` (:mod:`metakd.bench.epoch`) times one training epoch; ``python -m
metakd.bench.engines --e2e`` runs both.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metakd.bench.cases import _RAW0, INNER_LR, NUM_CLASSES, _input_shape, _make_case
from metakd.bench.common import (
    _median,
    _progress,
    _ratio,
    _rel_diff,
    _resolve_device,
    _versions,
)
from metakd.bench.engines_report import _plot, _print_table, to_markdown
from metakd.bench.epoch import run_epoch_bench
from metakd.bench.memory import _MemoryRunner
from metakd.bench.runners import _RUNNERS, ENGINES, EXTERNAL_ENGINES, _timed
from metakd.config import ConfigError, ModelConfig
from metakd.data.models import build_model
from metakd.functional.nn import FAST_BN_DEVICES

__all__ = ["ENGINES", "EXTERNAL_ENGINES", "run_bench", "run_epoch_bench"]

_MIB = 2.0**20


# --------------------------------------------------------------------------- the benchmark


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
