"""Cost of one hypergradient against the number H of metaparameter entries, for every method.

One student throughout (an MLP of ``depth`` linear layers of ``width`` units, tanh, input (32,), K = 10
classes: 2·depth parameter tensors), η random train batches (x, y, teacher logits), a validation batch,
plain SGD inner steps (γ = 0.1) and the per-class distillation loss

    L_train = mean_i [β1[y_i]·CE(y_i, s_i) + β2[y_i]·CE(softmax(t_i/T[y_i]), softmax(s_i/T[y_i]))]
              + Σ_l wd_l/2 · ‖w_l‖²

with β = σ(r), T = 0.1 + 9.9·σ(r), wd = 1e-3·exp(r) from raw leaves r. The metaparameters at each H
(anything not listed is a fixed number: β1 = σ(0.3), β2 = σ(-0.5), T = 0.1 + 9.9·σ(-1.2), wd = 1e-3):

    H = 1: T          H = 3: β1, β2, T          H = K: T per class [K]
    H = 3K: β1, β2, T per class [3, K]          H = 3K + 2·depth: those and one wd per parameter tensor

(K = 10, depth = 35: H = 1, 3, 10, 30, 100). Methods, each one call:

``plain``               η ordinary training steps (module forward/backward, ``torch.optim.SGD``)
``reverse``             ``hypergradient(method="reverse")`` through η steps
``reverse-checkpoint``  the same with ``checkpoint=True``
``forward``             ``hypergradient(method="forward")`` through η steps
``online-step``         one :func:`metakd.hypergrad.tangent_step` (what the trainer's online mode pays
                        per training step; carried from Z = 0)
``implicit-cg``         ``hypergradient(method="implicit")``: CG with J iterations (tol 0: all J run),
                        double-backward HVPs, L_train on the first train batch
``implicit-cg-func``    the same with ``hvp="func"`` (torch.func jvp of grad)
``implicit-neumann``    the Neumann series with J terms, α = γ

Time: one warm-up call per method (at the smallest H), then ``repeats`` calls interleaved round-robin over the
methods; medians. Peak memory as in :mod:`metakd.bench.memory`: on CPU one more call per case in a process
forked from a server that never runs torch ops (peak RSS minus RSS before the call); on CUDA
``max_memory_allocated`` minus the allocation before the call. ``python -m metakd.bench.scaling --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metakd.bench.common import (
    _fmt,
    _median,
    _progress,
    _rel_diff,
    _reset_peak_rss,
    _resolve_device,
    _status_kib,
    _versions,
)
from metakd.bench.scaling_cases import INNER_LR, _make_case, meta_names
from metakd.bench.scaling_runners import _RUNNERS, METHODS, _timed
from metakd.config import ConfigError

__all__ = ["METHODS", "meta_names", "run_scaling_bench", "scaling_markdown"]

_MIB = 2.0**20


# --------------------------------------------------------------------------- CPU peak memory


def _memory_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in a forked child: warm up on the smallest case, then peak RSS increase (MiB)."""
    try:
        torch.set_num_threads(spec["threads"])
        dev = torch.device("cpu")
        run = _RUNNERS[spec["method"]]
        run(_make_case(spec["h"], spec["depth"], spec["width"], 2, 1, 1, dev))
        case = _make_case(
            spec["h"], spec["depth"], spec["width"], spec["batch_size"], spec["eta"],
            spec["iterations"], dev, spec["damping"],
        )  # fmt: skip
        before = _status_kib("VmRSS")
        if before is not None and _reset_peak_rss():
            _timed(run, case, dev)
            peak = _status_kib("VmHWM") or before
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            _timed(run, case, dev)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mem_mib": max(peak - before, 0) / 1024.0}
    except Exception as exc:  # reported in the results instead of killing the bench
        return {"error": f"{type(exc).__name__}: {exc}"}


def _memory_server() -> None:
    """Fork server as :func:`metakd.bench.memory._memory_server`: it never runs a torch op itself."""
    for line in sys.stdin:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            with os.fdopen(w, "w") as fh:
                fh.write(json.dumps(_memory_case(json.loads(line))))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        out = text or json.dumps({"error": f"memory process died (wait status {status})"})
        sys.stdout.write(out.replace("\n", " ") + "\n")
        sys.stdout.flush()


def _measure_memory(specs: list[dict[str, Any]], quiet: bool) -> list[dict[str, Any]]:
    code = "import metakd.bench.scaling as b; b._memory_server()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = []
    try:
        for spec in specs:
            _progress(quiet, f"memory  H={spec['h']:<3} {spec['method']}")
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            out.append(json.loads(line) if line else {"error": "memory server exited"})
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return out


# --------------------------------------------------------------------------- the benchmark


def run_scaling_bench(
    hs: Sequence[int] = (1, 3, 10, 30, 100),
    *,
    eta: int = 10,
    iterations: int = 10,
    damping: float = 1.0,
    depth: int = 35,
    width: int = 32,
    batch_size: int = 64,
    repeats: int = 3,
    methods: Sequence[str] | None = None,
    device: str = "cpu",
    threads: int | None = 1,
    memory: bool = True,
    out: Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Time (median of ``repeats``) and peak memory of one hypergradient per method and H.

    ``eta``: unrolled steps of reverse/forward (and ``plain``); ``iterations``: J of the implicit
    solvers, all run (tol 0; a CG that meets a non-positive curvature is an error, raise ``damping``). Writes ``scaling.json`` and ``scaling.md`` to ``out``. Returns ``{"config", "env",
    "results"}``; a row has ``method, h, time_s, times_s, peak_mem_mib, steps`` (time over one
    ``plain`` step, i.e. plain / η) and ``rel_diff`` (forward and checkpoint against ``reverse``,
    ``implicit-cg-func`` against ``implicit-cg``).
    """
    names = list(METHODS) if methods is None else list(methods)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"unknown scaling methods {unknown}; choose from {list(METHODS)}")
    if min(eta, iterations, depth, width, batch_size, repeats) < 1:
        raise ConfigError("eta, iterations, depth, width, batch_size and repeats must be >= 1")
    hs = sorted(set(int(h) for h in hs))
    for h in hs:
        meta_names(h, 2 * depth)
    dev = _resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    cells = [(n, h) for h in hs for n in names]
    mem: dict[tuple[str, int], dict[str, Any]] = {}
    if memory and dev.type == "cpu":
        specs = [
            {"method": n, "h": h, "depth": depth, "width": width, "batch_size": batch_size,
             "eta": eta, "iterations": iterations, "damping": damping,
             "threads": torch.get_num_threads()}
            for n, h in cells
        ]  # fmt: skip
        mem = dict(zip(cells, _measure_memory(specs, quiet)))
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    grads: dict[tuple[str, int], Tensor | None] = {}
    errors: dict[tuple[str, int], str] = {}
    warmed: set[str] = set()
    for h in hs:
        case = _make_case(h, depth, width, batch_size, eta, iterations, dev, damping)
        for n in names:
            if n in warmed:
                continue
            try:
                _timed(_RUNNERS[n], case, dev)  # one warm-up per method, at the smallest H
            except Exception as exc:
                errors[(n, h)] = f"{type(exc).__name__}: {exc}"
            warmed.add(n)
        for i in range(repeats):
            _progress(quiet, f"timing  H={h:<3} repeat {i + 1}/{repeats}")
            for n in names:
                if (n, h) in errors:
                    continue
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                try:
                    wall, res = _timed(_RUNNERS[n], case, dev)
                except Exception as exc:
                    errors[(n, h)] = f"{type(exc).__name__}: {exc}"
                    continue
                if dev.type == "cuda":
                    peak = (torch.cuda.max_memory_allocated(dev) - base) / _MIB
                    prev = mem.get((n, h), {}).get("peak_mem_mib", 0.0)
                    mem[(n, h)] = {"peak_mem_mib": max(peak, prev)}
                times[(n, h)].append(wall)
                grads[(n, h)] = res
        del case
    refs = {
        "forward": "reverse",
        "reverse-checkpoint": "reverse",
        "implicit-cg-func": "implicit-cg",
    }
    rows = []
    for n, h in cells:
        t = _median(times[(n, h)])
        plain = _median(times.get(("plain", h), []))
        ref = refs.get(n)
        rows.append({
            "method": n, "h": h, "time_s": t, "times_s": times[(n, h)],
            "peak_mem_mib": mem.get((n, h), {}).get("peak_mem_mib"),
            "steps": t / (plain / eta) if t is not None and plain else None,
            "rel_diff": _rel_diff(grads.get((n, h)), grads.get((ref, h))) if ref else None,
            "error": errors.get((n, h)) or mem.get((n, h), {}).get("error"),
        })  # fmt: skip
    n_params = sum(p.numel() for p in _make_case(1, depth, width, 2, 1, 1, dev).params.values())
    result = {
        "config": {
            "hs": hs, "eta": eta, "iterations": iterations, "damping": damping, "depth": depth, "width": width,
            "num_params": n_params, "num_tensors": 2 * depth, "batch_size": batch_size,
            "repeats": repeats, "methods": names, "device": str(dev),
            "threads": torch.get_num_threads(), "inner_optimizer": f"sgd(lr={INNER_LR})",
            "meta": {h: {k: list(s) for k, s in meta_names(h, 2 * depth).items()} for h in hs},
        },
        "env": _versions(dev),
        "results": rows,
    }  # fmt: skip
    md = scaling_markdown(result)
    if not quiet:
        print(md, flush=True)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "scaling.md").write_text(md)
    return result


def scaling_markdown(result: dict[str, Any]) -> str:
    """Tables: seconds (and training steps) per hypergradient, peak MiB, per method and H."""
    cfg, env = result["config"], result["env"]
    hs = cfg["hs"]
    by = {(r["method"], r["h"]): r for r in result["results"]}
    head = (
        f"MLP of {cfg['depth']} linear layers × {cfg['width']} ({cfg['num_params']} parameters, "
        f"{cfg['num_tensors']} tensors), batch {cfg['batch_size']}, η = {cfg['eta']}, implicit "
        f"J = {cfg['iterations']} (damping {cfg['damping']}), device `{cfg['device']}` ({env.get('gpu') or env['cpu']}), "
        f"{cfg['threads']} thread(s), torch {env['torch']}, median of {cfg['repeats']}"
    )
    lines = [
        head,
        "",
        "Seconds per call (in parentheses: in units of one plain training step):",
        "",
    ]
    lines += ["| method | " + " | ".join(f"H={h}" for h in hs) + " |", "|---" * (1 + len(hs)) + "|"]
    for n in cfg["methods"]:
        cells = []
        for h in hs:
            r = by[(n, h)]
            if r["time_s"] is None:
                cells.append("error")
            else:
                cells.append(f"{_fmt(r['time_s'])} ({_fmt(r['steps'], '.1f')})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Peak memory increase during the call, MiB:", ""]
    lines += ["| method | " + " | ".join(f"H={h}" for h in hs) + " |", "|---" * (1 + len(hs)) + "|"]
    for n in cfg["methods"]:
        lines.append(
            f"| {n} | " + " | ".join(_fmt(by[(n, h)]["peak_mem_mib"], ".0f") for h in hs) + " |"
        )
    diffs = [r for r in result["results"] if r["rel_diff"] is not None]
    if diffs:
        worst: dict[str, float] = {}
        for r in diffs:
            worst[r["method"]] = max(worst.get(r["method"], 0.0), r["rel_diff"])
        lines += ["", "Largest relative difference over H: " + ", ".join(
            f"{m} {v:.1e}" for m, v in worst.items()
        ) + " (forward/checkpoint against reverse, implicit-cg-func against implicit-cg)."]  # fmt: skip
    lines += [
        f"- error in {r['method']} at H = {r['h']}: {r['error']}"
        for r in result["results"]
        if r["error"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m metakd.bench.scaling``: every option of :func:`run_scaling_bench`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--hs", default="1,3,10,30,100", help="metaparameter counts H")
    ap.add_argument("--eta", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=10, help="implicit solver iterations J")
    ap.add_argument("--damping", type=float, default=1.0, help="implicit solvers' damping δ")
    ap.add_argument("--depth", type=int, default=35)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {list(METHODS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    try:
        run_scaling_bench(
            [int(h) for h in a.hs.split(",") if h.strip()], eta=a.eta, iterations=a.iterations, damping=a.damping,
            depth=a.depth, width=a.width, batch_size=a.batch_size, repeats=a.repeats,
            methods=a.methods.split(",") if a.methods else None, device=a.device,
            threads=a.threads, memory=not a.no_memory, out=a.out,
        )  # fmt: skip
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
