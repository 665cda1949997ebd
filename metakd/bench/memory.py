"""CPU peak memory of one engine-bench case: each case runs in a process forked from a server that never
runs a torch op (:func:`_memory_server`, driven by :class:`_MemoryRunner`); :func:`_memory_case` is
the measurement in the child (peak RSS increase, MiB)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any

import torch

from metakd.bench.cases import _make_case
from metakd.bench.common import _reset_peak_rss, _status_kib
from metakd.bench.runners import _RUNNERS, _timed

__all__ = ["_MemoryRunner", "_memory_case", "_memory_server"]


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
            code = "import metakd.bench.memory as b; b._memory_server()"
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
