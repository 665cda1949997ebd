"""User components by import path (metakd/plugins.py): the kind is checked before anything is
called, errors are one line, and modules in the working directory are found (issue 23, items 11, 13)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from metakd import plugins
from metakd.config import ConfigError, ModelConfig
from metakd.data.models import build_model
from metakd.training import forecast
from metakd_cli.main import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cwd_module(tmp_path, monkeypatch):
    """Write ``<name>.py`` into a fresh working directory; sys.path / sys.modules restored after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if os.path.realpath(p or ".") != str(tmp_path)]
    )
    written: list[str] = []

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        written.append(name)
        return path

    yield write
    for name in written:
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- item 11: kind first


def test_os_system_as_a_model_is_refused_before_it_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    cfg = ModelConfig(name="os:system", kwargs={"command": f"touch {marker}"})
    with pytest.raises(ConfigError) as info:
        build_model(cfg, (3,), 2)
    assert not marker.exists()
    message = str(info.value)
    assert "\n" not in message
    assert "model 'os:system': found the built-in function" in message and "system" in message
    assert "torch.nn.Module subclass" in message


def test_os_system_as_a_forecaster_or_estimator_is_refused_before_it_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="forecaster 'os:system': found the built-in function"):
        forecast.get("os:system", command=f"touch {marker}")
    with pytest.raises(ValueError, match=r"estimator 'os\.system': found the built-in function"):
        forecast.SklearnForecaster(estimator="os.system", command=f"touch {marker}")
    assert not marker.exists()


def test_os_system_on_the_command_line_exits_2_and_runs_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    result = CliRunner().invoke(
        app,
        ["train", "student.name=os:system", f"student.kwargs.command=touch {marker}",
         "wandb.mode=disabled", "data.cache_dir=cache", "--out", str(tmp_path / "run"), "-q"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert not marker.exists()
    assert "Error: student.name 'os:system': found the built-in function" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before a run directory or a teacher


def test_model_kinds_classes_and_annotated_factories(cwd_module) -> None:
    cwd_module(
        "user_nets",
        """
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes: int, width: int = 4) -> None:
                super().__init__()
                self.fc = nn.Linear(3, num_classes)

        def annotated(num_classes: int) -> nn.Linear:
            return nn.Linear(3, num_classes)

        def unannotated(num_classes):
            return nn.Linear(3, num_classes)

        NOT_A_CLASS = 3
        """,
    )
    assert isinstance(build_model(ModelConfig(name="user_nets:Net"), (3,), 5), nn.Module)
    built = build_model(ModelConfig(name="user_nets:annotated"), (3,), 5)
    assert isinstance(built, nn.Linear) and built.out_features == 5
    with pytest.raises(
        ConfigError, match=r"found the function user_nets\.unannotated, not a torch"
    ):
        build_model(ModelConfig(name="user_nets:unannotated"), (3,), 5)
    with pytest.raises(ConfigError, match=r"found an int \(3\)"):
        build_model(ModelConfig(name="user_nets:NOT_A_CLASS"), (3,), 5)
    with pytest.raises(ConfigError, match=r"found the class collections\.OrderedDict, not a torch"):
        build_model(ModelConfig(name="collections:OrderedDict"), (3,), 5)


def test_estimator_kind_accepts_sklearn_and_refuses_a_forecaster_class() -> None:
    assert plugins.load_estimator("sklearn.linear_model:Ridge").__name__ == "Ridge"
    with pytest.raises(
        ConfigError, match=r"found the class metakd\.training\.forecast\.LinearForecaster"
    ):
        plugins.load_estimator(
            "metakd.training.forecast:LinearForecaster"
        )  # fit/predict, no get_params


def test_load_object_general_api_and_messages() -> None:
    assert plugins.load_object("math:sqrt", kind="objective")(4.0) == 2.0
    assert plugins.load_object("os.path:join") is os.path.join  # dotted attribute path
    with pytest.raises(ConfigError, match=r"objective 'math:pi': found a float \(3\.14"):
        plugins.load_object("math:pi", kind="objective")
    with pytest.raises(ConfigError, match=r"is not an import path; write 'package\.module:Name'"):
        plugins.load_object("no-dots", kind="objective")
    with pytest.raises(ConfigError, match="has no attribute 'nope'; check the name after ':'"):
        plugins.load_object("math:nope")
    with pytest.raises(
        ConfigError, match=r"x 'math:e': found a float \(2\.71.*\), not a string; say hello"
    ):
        plugins.load_object(
            "math:e",
            kind="x",
            check=lambda o: isinstance(o, str),
            expected="a string",
            fix="say hello",
        )


# --------------------------------------------------------------------------- item 13: the cwd


def test_a_module_in_the_working_directory_is_found_and_appended_once(cwd_module, tmp_path) -> None:
    cwd_module(
        "user_forecaster",
        """
        import torch

        class Flat:
            def __init__(self, level: float = 0.0) -> None:
                self.level = level

            def fit(self, steps, values):
                return self

            def predict(self, steps):
                return torch.full((len(steps), 1), self.level)
        """,
    )
    assert str(tmp_path) not in sys.path
    f = forecast.get("user_forecaster:Flat", level=2.0)
    assert f.predict(torch.arange(2.0)).tolist() == [[2.0], [2.0]]
    assert sys.path[-1] == str(tmp_path)  # appended: never shadows an installed package
    forecast.get("user_forecaster:Flat")
    assert sys.path.count(str(tmp_path)) == 1


def test_a_hypergradient_method_in_the_working_directory_is_found(cwd_module) -> None:
    """meta.hypergrad.method=user_method:Mine imports like every other user component (item 13)."""
    from metakd.training import methods

    cwd_module(
        "user_method",
        """
        from metakd.training.methods import LookAhead

        class Mine(LookAhead):
            pass
        """,
    )
    cls = methods.get("user_method:Mine")
    assert cls.__name__ == "Mine" and issubclass(cls, methods.HypergradMethod)


def test_cwd_never_shadows_an_installed_module(cwd_module) -> None:
    cwd_module("json", "raise RuntimeError('the cwd json.py must not be imported')")
    assert plugins.load_object("json:dumps") is json.dumps


def test_import_errors_inside_a_user_module_are_one_line(cwd_module) -> None:
    cwd_module("needs_dep", "import no_such_dependency_xyz\n")
    with pytest.raises(ConfigError, match=r"importing module 'needs_dep' failed \(No module named"):
        plugins.load_object("needs_dep:X", kind="model")
    cwd_module("raises_at_import", "raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError) as info:
        plugins.load_object("raises_at_import:X", kind="model")
    assert "raised RuntimeError: boom; fix that module" in str(info.value)
    with pytest.raises(
        ConfigError, match=r"cannot import module 'no_such_pkg_q.mod' .*run from the folder"
    ):
        plugins.load_object("no_such_pkg_q.mod:X", kind="model")


@pytest.mark.skipif(
    shutil.which("metakd") is None, reason="the metakd console script is not installed"
)
def test_console_script_finds_a_forecaster_in_the_working_directory(tmp_path) -> None:
    """The console script's sys.path[0] is its bin folder, not the cwd: no PYTHONPATH=. needed."""
    (tmp_path / "mymod.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Damped:
                def fit(self, steps, values):
                    self.last = values[-1]
                    return self

                def predict(self, steps):
                    return self.last.expand(len(steps), -1).clone()
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [shutil.which("metakd"), "train", "meta.method=forecast", "forecast.forecaster=mymod:Damped",
         "train.epochs=12", "forecast.window=4", "teacher.epochs=5", "data.cache_dir=cache", "--out", "run", "-q", "--json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["predicted_steps"] > 0
