"""Forward mode's peak memory is flat in η; reverse mode's grows (subprocess peak RSS, generous slack)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import metakd
    from metakd.functional import optim
    from metakd.functional.losses import cross_entropy, distillation_loss

    method, eta = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 10))
    fm = metakd.FunctionalModel(net)
    x, y, t = torch.randn(256, 256), torch.randint(0, 10, (256,)), torch.randn(256, 10)

    def tl(p, m, b):
        return distillation_loss(fm(p, x), y, t, beta1=m["b1"], beta2=m["b2"], temperature=m["T"])

    def vl(p, b):
        return cross_entropy(fm(p, x), y)

    meta = {k: torch.tensor(v, requires_grad=True) for k, v in (("b1", .5), ("b2", .5), ("T", 2.))}
    params = dict(net.named_parameters())
    # warm-up at η = 1 so that allocator and library start-up are in the baseline
    metakd.hypergradient(tl, vl, params, meta, [None], None, optim.sgd(0.1), method)
    # VmHWM (peak RSS of this address space; ru_maxrss would inherit the parent's peak) is reset
    # to the current RSS by writing 5 to clear_refs.
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    metakd.hypergradient(tl, vl, params, meta, [None] * eta, None, optim.sgd(0.1), method)
    peak = status("VmHWM")
    print(json.dumps({"extra_mib": (peak - base) / 1024}))
    """
)


def _extra_mib(method: str, eta: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(eta)],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status (Linux)")
def test_forward_memory_flat_in_eta_reverse_grows():
    # one step of the reverse graph holds ~ P (0.5 MiB params) + activations (256x512 floats) ≈ 2 MiB
    rev = _extra_mib("reverse", 64)
    fwd = _extra_mib("forward", 64)
    assert rev > 60, f"reverse mode at η=64 should hold the unrolled graph, got {rev:.1f} MiB"
    assert fwd < 0.25 * rev, f"forward mode grew with η: {fwd:.1f} MiB vs reverse {rev:.1f} MiB"
