"""``train.precision`` (issue 30, item 6): the real steps' forward passes under torch.autocast, master
weights / optimizer state / loss / hypergradient in float32 (metakd.training.precision).

On the CPU: bf16 runs (autocast works there), fp16 is refused; the GradScaler's logic is exercised on
the CPU through :class:`Precision` directly; a CUDA-only fp16 run is skipped without a GPU."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from typer.testing import CliRunner

from metakd import hypergrad
from metakd.config import Config, ConfigError
from metakd.runs import ledger
from metakd.runs.build import build
from metakd.runs.check_grad import check_grad
from metakd.runs.config import load_config
from metakd.runs.run import load_trainer, train_run
from metakd.training.methods import LookAhead, compiled
from metakd.training.methods.online import Online
from metakd.training.precision import Precision, autocast_dtype
from metakd.training.trainer import Trainer
from metakd_cli.main import app

F32_EPS = torch.finfo(torch.float32).eps  # 2^-23
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-8 (torch's eps: the spacing at 1, as float32's)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))  # the synthetic teacher is trained once


def _cfg(cache: str, *overrides: str) -> Config:
    base = [
        "device=cpu", "teacher.epochs=200", "train.epochs=12", "train.eval_every=0",
        "train.lr=0.05", "train.optimizer=adam", "meta.unroll=3", "train.checkpoint_every=4",
        f"data.cache_dir={cache}", "wandb.mode=disabled",
    ]  # fmt: skip
    return load_config(None, [*base, *overrides])


def _trainer(cfg: Config) -> Trainer:
    splits, targets, model = build(cfg, torch.device("cpu"))
    return Trainer(cfg, model, splits, targets, device="cpu")


class DtypeHook:
    """Records the dtype of every output of a module (a forward hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.dtypes: list[torch.dtype] = []
        module.register_forward_hook(lambda mod, args, out: self.dtypes.append(out.dtype))

    def take(self) -> set[torch.dtype]:
        seen, self.dtypes = set(self.dtypes), []
        return seen


def test_fp16_on_the_cpu_is_refused_in_one_line(cache, tmp_path):
    with pytest.raises(ConfigError, match=r"precision=fp16 needs CUDA.*use train\.precision=bf16"):
        Precision.of("fp16", "cpu")
    cfg = _cfg(cache, "train.precision=fp16")
    with pytest.raises(ConfigError, match=r"train\.precision=bf16"):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory
    with pytest.raises(ConfigError, match=r"train\.precision=bf16"):
        build(cfg, torch.device("cpu"))  # check-grad, the ledger's calibration, load_trainer
    assert Precision.of("fp32", "cpu").exact and autocast_dtype("bf16", "cpu") is torch.bfloat16
    for command in ("train", "check-grad"):
        result = CliRunner().invoke(
            app, [command, "device=cpu", "train.precision=fp16", f"data.cache_dir={cache}"]
        )
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "use train.precision=bf16" in lines[0], result.stderr


def test_bf16_real_steps_autocast_and_master_weights_stay_float32(cache):
    """The student's Linear runs in bfloat16 in each real step and in float32 in each hypergradient;
    weights, gradients and Adam's moments are float32; the run trains and moves λ."""
    tr = _trainer(_cfg(cache, "train.precision=bf16"))
    assert type(tr.hypergrad_method) is LookAhead  # train.compile=auto: not compiled (float32 only)
    linear = next(m for m in tr.model.modules() if isinstance(m, nn.Linear))
    hook = DtypeHook(linear)
    raw0 = {k: v.clone() for k, v in tr.meta.raw.items()}  # type: ignore[union-attr]
    losses = []
    for s in range(6):
        tr.schedule.before_real_step(s)
        assert hook.take() == {torch.float32}, s  # the η = 3 unroll of the meta step
        losses.append(tr.plain_real_step(tr.batch(s)))
        assert hook.take() == {torch.bfloat16}, s  # the real step's forward
        tr.step = s + 1
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(not torch.equal(raw0[k], v) for k, v in tr.meta.raw.items())  # type: ignore[union-attr]
    for p in tr.model.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    for st in tr.optimizer.state.values():
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    summary = tr.train()  # the rest of the run through the loop
    assert summary["steps"] == tr.total_steps and summary["compiled"] is False


def test_bf16_hypergradient_is_the_float32_unroll(cache):
    """The hypergradient's precision: the η-step unroll runs in float32 on the master weights, outside
    autocast. (a) After bf16 real steps, the bf16 trainer's hypergradient equals, bit for bit, that of a
    float32 trainer holding the same state. (b) check-grad of the bf16 config against float64 finite
    differences: relative error <= 2^8·η·ε_f32 (~9e-5 at η = 3; measured 2.4e-5 on Adam's β1), a bound
    2^7/η below bf16's ε = 2^-8 — (c) the same unroll under bf16 autocast misses it by > 100x."""
    cfg16 = _cfg(cache, "train.precision=bf16")
    tr16 = _trainer(cfg16)
    for s in range(5):
        tr16._one_step(s)
    tr32 = _trainer(_cfg(cache))
    tr32.load_state_dict(copy.deepcopy(tr16.state_dict()))
    g16, ok16 = tr16.hypergradient(5)
    g32, ok32 = tr32.hypergradient(5)
    assert ok16 and ok32
    for k in g16:
        assert torch.equal(g16[k], g32[k]), k

    eta = cfg16.meta.unroll
    tol = 2**8 * eta * F32_EPS
    assert tol < BF16_EPS / 10
    result = check_grad(cfg16, eps=1e-3)
    for name, entry in result.items():
        assert entry["resolved"], name
        assert entry["rel_error"] <= tol, (name, entry)

    # (c) the control: differentiating through a bf16-autocast unroll is off by percent, not 1e-5
    tr = _trainer(cfg16)
    batches, vb = [tr.batch(i) for i in range(eta)], tr.val_batch(0)
    inner, state = tr.inner_optimizer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = hypergrad.hypergradient(
            tr.train_loss, tr.val_loss, tr.fmodel.params(), tr.meta.raw, batches, vb,  # type: ignore[union-attr]
            optimizer=inner, opt_state=state, method="reverse",
        ).grads  # fmt: skip
    worst = max(
        abs(float(bf[n]) - e["finite_difference"]) / abs(e["finite_difference"])
        for n, e in result.items()
    )
    assert worst > 100 * tol


def test_online_runs_unfused_with_float32_tangents(cache):
    """Online under bf16: the tangent step in float32 (check-grad's float32 tolerance), the real step
    apart under autocast."""
    over = ["train.precision=bf16", "meta.hypergrad.method=online"]
    tr = _trainer(_cfg(cache, *over))
    assert isinstance(tr.hypergrad_method, Online) and tr.hypergrad_method.fused is False
    assert _trainer(_cfg(cache, over[1])).hypergrad_method.fused is True  # type: ignore[union-attr]
    hook = DtypeHook(next(m for m in tr.model.modules() if isinstance(m, nn.Linear)))
    tr._one_step(0)
    assert hook.take() == {torch.float32, torch.bfloat16}  # tangent step, then the real step
    summary = tr.train()
    assert summary["hypergradient_steps"] > 0 and summary["skipped_meta_steps"] == 0
    for entry in check_grad(_cfg(cache, *over), eps=1e-3).values():
        assert entry["rel_error"] <= 2**8 * 3 * F32_EPS


def test_compiled_steps_refuse_bf16(cache):
    """The compiled path is float32 only: compile=on refuses bf16 naming it, auto runs eager."""
    with pytest.raises(ConfigError, match=r"train\.compile=on: train\.precision=bf16"):
        _trainer(_cfg(cache, "train.precision=bf16", "train.compile=on"))
    tr = _trainer(_cfg(cache, "train.precision=bf16", "train.epochs=20000"))
    use, why = compiled.compile_plan(tr, tr.hypergrad_method)
    assert not use and "float32 only" in why


def test_bf16_checkpoints_and_resume_are_exact(cache, tmp_path):
    """bf16 on the CPU is deterministic: two runs agree bit for bit, and a run resumed from its
    checkpoint (epoch 8) ends exactly as the uninterrupted one."""
    cfg = _cfg(cache, "train.precision=bf16")
    full = train_run(cfg, tmp_path / "a")
    again = train_run(cfg, tmp_path / "b")
    resumed = load_trainer(tmp_path / "a", epoch=8)
    assert resumed.step == 8 and resumed.precision.dtype is torch.bfloat16
    end = resumed.train()
    for key in ("meta", "meta_raw", "test_accuracy", "val_accuracy", "train_loss", "steps"):
        assert again[key] == full[key] == end[key], key
    # the bf16 run is not the float32 one (the autocast is real)
    fp32 = train_run(_cfg(cache), tmp_path / "c")
    assert fp32["meta_raw"] != full["meta_raw"]


def _write_folder(root: Path, per_class: int = 8, size: int = 8) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "emu"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


def test_live_teacher_autocasts_and_returns_float32(tmp_path):
    """data.augment: the live teacher's forward runs under bf16 autocast; its targets are float32 and
    equal the module's autocast output cast up."""
    _write_folder(tmp_path / "images")
    cfg = load_config(None, [
        "device=cpu", "data.name=imagefolder", f"data.root={tmp_path / 'images'}", "data.n_train=9",
        "data.n_val=6", "data.n_test=9", "data.data_seed=0", "data.augment=true",
        f"data.cache_dir={tmp_path / 'cache'}", "student.name=mlp", "teacher.model.name=mlp",
        "teacher.epochs=2", "train.batch_size=3", "train.epochs=1", "train.precision=bf16",
        "wandb.mode=disabled",
    ])  # fmt: skip
    splits, targets, model = build(cfg, torch.device("cpu"))
    assert targets is not None and targets.autocast is torch.bfloat16  # type: ignore[attr-defined]
    teacher = targets.module  # type: ignore[attr-defined]
    hook = DtypeHook(next(m for m in teacher.modules() if isinstance(m, nn.Linear)))
    x = splits.train.x[:3]
    out = targets(torch.arange(3), x)
    assert out.dtype == torch.float32 and hook.take() == {torch.bfloat16}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected: Tensor = teacher(x)
    assert torch.equal(out, expected.float())
    tr = Trainer(cfg, model, splits, targets, device="cpu")
    assert tr.batch(0)[2].dtype == torch.float32  # type: ignore[union-attr]
    assert np.isfinite(tr.train()["train_loss"])


def test_grad_scaler_logic_on_the_cpu():
    """fp16's GradScaler path, run on the CPU (the config refuses fp16 there; torch's CPU GradScaler
    takes the same steps): a finite step equals the unscaled one (the scale is a power of two), an
    overflow skips the step and halves the scale, and the state round-trips."""
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = copy.deepcopy(a)
    x = torch.randn(5, 4)
    plain, scaled = Precision(torch.bfloat16, "cpu"), Precision(torch.bfloat16, "cpu", scale=True)
    assert plain.state_dict() == {} and "grad_scaler" in scaled.state_dict()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    seen: list[int] = []
    for model, opt, prec in ((a, opt_a, plain), (b, opt_b, scaled)):
        prec.step(prec.forward(model, x).square().mean(), opt, lambda g: seen.append(len(g)))
    assert seen == [2, 2]  # reduce() got the optimizer's gradients
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    before = [p.clone() for p in b.parameters()]
    scale = scaled.state_dict()["grad_scaler"]["scale"]
    opt_b.zero_grad()
    scaled.step(b(x).sum() * float("inf"), opt_b)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))  # skipped
    state = scaled.state_dict()
    assert state["grad_scaler"]["scale"] == scale / 2
    fresh = Precision(torch.bfloat16, "cpu", scale=True)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_ledger_key_of_fp32_is_unchanged(cache):
    """fp32 runs keep their cached ledger keys (no precision field); bf16 is priced apart."""
    key32, fields32 = ledger.reference_key(_cfg(cache))
    key16, fields16 = ledger.reference_key(_cfg(cache, "train.precision=bf16"))
    assert "precision" not in fields32["train"] and fields16["train"]["precision"] == "bf16"
    assert key32 != key16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast + GradScaler need CUDA")
def test_fp16_on_cuda_trains_with_the_scaler(cache, tmp_path):
    cfg = _cfg(cache, "device=cuda", "train.precision=fp16")
    tr = _trainer(cfg)
    assert tr.precision.scaler is not None
    hook = DtypeHook(next(m for m in tr.model.modules() if isinstance(m, nn.Linear)))
    summary = tr.train()
    assert torch.float16 in hook.take() and np.isfinite(summary["train_loss"])
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert "grad_scaler" in tr.state_dict()
    full = train_run(cfg, tmp_path / "run")
    end = load_trainer(tmp_path / "run", epoch=8).train()
    assert end["meta_raw"] == full["meta_raw"]
