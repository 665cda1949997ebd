"""The meta step's seams (metakd.training.methods): registry, hooks, a user's method, checkpoint formats."""

from __future__ import annotations

import copy

import pytest
import torch
from test_trainer import _cfg, task  # noqa: F401  (the tiny in-memory task)

from metakd.config import ConfigError
from metakd.runs.config import load_config
from metakd.training import methods
from metakd.training.methods import HypergradMethod, LookAhead, Online, registry
from metakd.training.trainer import Trainer


def test_registry_lists_builtins_refuses_duplicates_and_names_the_valid_keys():
    assert methods.available() == {
        "finite-difference": "builtin", "forward": "builtin", "implicit": "builtin",
        "online": "builtin", "reverse": "builtin",
    }  # fmt: skip
    assert methods.get("forward") is LookAhead and methods.get("online") is Online
    with pytest.raises(ValueError, match=r"'reverse' is already registered \(builtin\)"):
        methods.register("reverse")(type("Dup", (HypergradMethod,), {}))
    with pytest.raises(ValueError, match=r"did you mean 'reverse'.*\['finite-difference', "):
        methods.get("revers")
    with pytest.raises(ConfigError, match=r"meta.hypergrad.method.*did you mean 'online'"):
        load_config(None, ["meta.hypergrad.method=onlin"])
    with pytest.raises(
        ValueError, match=r"hypergradient method 'nope.mod:X': cannot import module 'nope.mod'"
    ):
        methods.get("nope.mod:X")


def test_a_registered_method_is_built_by_its_key(task):  # noqa: F811
    class Halved(LookAhead):
        def hypergradient(self, step, *, train_steps=None, val_batch=None):
            grads, finite = super().hypergradient(
                step, train_steps=train_steps, val_batch=val_batch
            )
            return {n: g / 2 for n, g in grads.items()}, finite

    methods.register("test-halved")(Halved)
    try:
        splits, logits = task
        torch.manual_seed(0)
        ref = Trainer(_cfg("meta.method=hypergrad"), torch.nn.Linear(3, 2), splits, logits)
        torch.manual_seed(0)
        cfg = _cfg("meta.method=hypergrad", "meta.hypergrad.method=test-halved")
        halved = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
        assert isinstance(halved.hypergrad_method, Halved)
        g, _ = ref.hypergradient(0)
        h, _ = halved.hypergradient(0)
        assert all(torch.equal(h[n], g[n] / 2) for n in g)
    finally:
        registry._REGISTRY.pop("test-halved")


@pytest.mark.parametrize("schedule", ["hypergrad", "forecast"])
def test_user_method_by_import_path_takes_the_real_step_and_sees_every_hook(task, schedule):  # noqa: F811
    """A method that takes the real step itself (returns its loss) trains exactly like the plain
    step; its hooks run once per step, in order, with the schedule's phase (predict windows too)."""
    from plugins.my_method import RecordingLookAhead

    splits, logits = task
    over = [f"meta.method={schedule}", "train.epochs=12", "train.batch_size=5"]
    torch.manual_seed(0)
    plain = Trainer(_cfg(*over), torch.nn.Linear(3, 2), splits, logits)
    a = plain.train()
    torch.manual_seed(0)
    cfg = _cfg(*over, "meta.hypergrad.method=plugins.my_method:RecordingLookAhead")
    user = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    b = user.train()
    method = user.hypergrad_method
    assert isinstance(method, RecordingLookAhead)
    for key in ("meta_raw", "test_accuracy", "train_loss", "hypergradient_steps"):
        assert a[key] == b[key], key
    expected = []
    for s in range(user.total_steps):
        ph = user.phase(s)
        expected += [("before", s, ph), ("real", s, ""), ("after", s, ph)]
    assert method.calls == expected
    assert {c[2] for c in method.calls} >= (
        {"optimize", "predict"} if schedule == "forecast" else {"optimize"}
    )


def test_a_path_to_something_else_is_a_clear_error(task):  # noqa: F811
    splits, logits = task
    cfg = _cfg("meta.hypergrad.method=plugins.my_method:NotAMethod")
    with pytest.raises(
        ConfigError, match=r"NotAMethod.*not a metakd.training.methods.HypergradMethod"
    ):
        Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)


def test_methods_without_meta_steps_refuse_hypergradients(task):  # noqa: F811
    splits, logits = task
    trainer = Trainer(_cfg("meta.method=random"), torch.nn.Linear(3, 2), splits, logits)
    assert trainer.hypergrad_method is None and trainer.phase(0) == "train"
    with pytest.raises(ValueError, match=r"meta.method=random takes no meta steps"):
        trainer.hypergradient(0)


def test_checkpoints_from_before_the_seam_still_load(task):  # noqa: F811
    """Checkpoints written before metakd.training.methods kept the online tangents at the top level
    (``"tangents"``); they load and continue exactly like the current format."""
    splits, logits = task
    over = ["meta.method=hypergrad", "meta.hypergrad.method=online", "train.batch_size=4",
            "train.epochs=6", "meta.optimizer=adam", "meta.lr=0.1", "meta.every=2"]  # fmt: skip
    cfg = _cfg(*over)
    torch.manual_seed(0)
    full = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
    saved: dict = {}
    summary = full.train(
        on_epoch_end=lambda e: saved.setdefault(e, copy.deepcopy(full.state_dict()))
    )
    new = saved[3]
    assert set(new["hypergrad_method"]) == {"tangents"} and "tangents" not in new
    old = {k: v for k, v in new.items() if k != "hypergrad_method"}
    old["tangents"] = new["hypergrad_method"]["tangents"]
    for state in (new, old):
        resumed = Trainer(cfg, torch.nn.Linear(3, 2), splits, logits)
        resumed.load_state_dict(copy.deepcopy(state))  # (torch optimizers load without copying)
        assert resumed.train()["meta_raw"] == summary["meta_raw"]
