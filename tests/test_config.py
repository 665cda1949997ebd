"""Config files in configs/ and the config error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metakd.config import Config, ConfigError, config_to_dict
from metakd.runs.config import load_config, resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_is_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the resolved config round-trips (what run directories store as config.yaml)
    text = yaml.safe_dump(config_to_dict(cfg))
    assert Config.model_validate(yaml.safe_load(text)) == cfg


def test_synthetic_yaml_is_the_embedded_default():
    # meta.preset=auto resolves to paper on the synthetic task; the rest are the schema's defaults
    assert (
        load_config(ROOT / "configs" / "synthetic.yaml") == resolve(Config()) == load_config(None)
    )
    assert load_config(None).meta.preset == "paper" and Config().meta.preset == "auto"


def test_published_and_cifar_protocols():
    pub = load_config(ROOT / "configs" / "synthetic_published.yaml")
    assert pub.data.published and pub.data.val_is_test and pub.data.name == "synthetic"
    cif = load_config(ROOT / "configs" / "cifar10.yaml")
    assert cif.data.name == "imagefolder"
    assert cif.data.root == "../shared/datasets/cifar10-jpg/train"
    assert (cif.data.n_train, cif.data.n_val, cif.data.n_test) == (10112, 10112, 10000)
    assert (cif.student.name, cif.teacher.model.name) == ("cifar_very_tiny", "cifar_tiny")
    assert cif.teacher.checkpoint == "runs/teachers/cifar_tiny.pt"
    t = cif.train
    assert (t.optimizer, t.lr, t.batch_size, t.epochs) == ("adam", 1e-3, 128, 100)
    assert (t.eval_every, t.log_every, t.checkpoint_every) == (0, 10, 1)
    assert (cif.meta.method, cif.meta.unroll, cif.meta.every) == ("hypergrad", 1, 1)
    f = cif.forecast
    assert (f.window, f.optimize, f.predict) == (10, 1, 1)
    tv = load_config(ROOT / "configs" / "cifar10_torchvision.yaml")
    assert tv.data.name == "cifar10" and tv.train == cif.train and tv.meta == cif.meta
    fc = load_config(ROOT / "configs" / "forecasters.yaml")
    assert fc.meta.method == "forecast" and fc.data.name == "synthetic"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_calls_metakd_train_with_valid_overrides(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "metakd"
    cmd = sweep["command"]
    assert cmd[:2] == ["${program}", "train"] and cmd[-1] == "${args_no_hyphens}"
    config = ROOT / cmd[2]
    assert config.is_file()
    fixed = [c for c in cmd[3:-1] if "=" in c]
    base = load_config(config, fixed)
    assert base.wandb.mode == "online"  # agents report to the sweep
    assert sweep["metric"]["name"] in {"test_accuracy", "val_accuracy", "best_test_accuracy"}
    for key, spec in sweep["parameters"].items():
        for value in spec["values"]:
            # exactly what ${args_no_hyphens} passes: key=value
            cfg = load_config(config, [*fixed, f"{key}={value}"])
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value


# --------------------------------------------------------------------------- errors

BAD = [
    (["meta.unrol=3"], "unknown config key 'meta.unrol'; did you mean 'meta.unroll'?"),
    (["sed=1"], "did you mean 'seed'?"),
    (["train.epochs=many"], "config key 'train.epochs': Input should be a valid integer"),
    (["train.lr=-0.1"], "config key 'train.lr': Input should be greater than 0 (got -0.1)"),
    (["meta.unroll=0"], "config key 'meta.unroll': Input should be greater than or equal to 1"),
    (
        ["meta.params.temperature.lo=10", "meta.params.temperature.hi=2"],
        "config key 'meta.params.temperature': range needs lo < hi, got lo=10.0, hi=2.0",
    ),
    (["device=gpu"], "config key 'device': Input should be 'auto', 'cpu' or 'cuda' (got 'gpu')"),
    (["meta.params.temprature.init=2"], "did you mean 'meta.params.temperature'?"),
    (["train.lr.x=1"], "'lr' is not a section"),
    (["unroll"], "not of the form key=value"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[0][0] for b in BAD])
def test_bad_override_message(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert len(text.splitlines()) == 1


def test_several_problems_one_line_each_with_file_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: -1\n  epocs: 3\nmeta:\n  unroll: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(str(path) in line for line in lines)
    assert any("'train.epocs'" in line and "'train.epochs'" in line for line in lines)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_override_edits_one_field_of_a_default_metaparameter():
    cfg = load_config(None, ["meta.params.temperature.lo=0.5"])
    t = cfg.meta.params["temperature"]
    assert (t.lo, t.hi, t.init_range) == (0.5, 10.0, (-2.0, 0.0))
    assert set(cfg.meta.params) == {"beta1", "beta2", "temperature"}


def test_overrides_apply_over_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmeta:\n  unroll: 4\n  method: forecast\n")
    cfg = load_config(path, ["meta.unroll=7", "forecast.forecaster=linear", "seed=5"])
    assert (cfg.name, cfg.meta.unroll, cfg.meta.method, cfg.seed) == ("x", 7, "forecast", 5)
