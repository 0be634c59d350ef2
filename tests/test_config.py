from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from wsi_lightning import build, config
from wsi_lightning.errors import ConfigError


def test_every_experiment_loads_and_builds_its_method():
    from wsi_lightning.methods.base import SlideEstimator

    names = config.list_experiments()
    assert "abmil" in names
    for name in names:  # paper settings (the demo blocks: tests/test_every_experiment.py, with data)
        for demo in (False,):
            cfg = config.load(name, demo=demo)
            assert cfg.name == name
            cls, kwargs = build.method_kwargs(cfg)
            if issubclass(cls, SlideEstimator):  # two-step scikit-learn baselines: no torch parameters
                cls(**kwargs)
                continue
            model = cls(in_dim=8, num_classes={"label": 2}, **kwargs)
            assert sum(p.numel() for p in model.parameters()) > 0


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"trainer\.max_epoch'.*did you mean 'trainer\.max_epochs'"):
        config.load("abmil", ["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match="valid keys"):
        config.load("abmil", ["nonsense=1"])


def test_unknown_method_and_method_key():
    with pytest.raises(ConfigError, match="unknown method 'nope'.*abmil"):
        build.method_kwargs(config.load("abmil", ["method.name=nope"]))
    with pytest.raises(ConfigError, match=r"method\.heads.*valid keys"):
        build.method_kwargs(config.load("abmil", ["method.heads=3"]))


def test_bad_values_and_override_syntax():
    with pytest.raises(ConfigError, match="optim.name"):
        config.load("abmil", ["optim.name=lbfgs"])
    with pytest.raises(ConfigError, match="key=value"):
        config.load("abmil", ["trainer.max_epochs"])
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        config.load("nope")


def test_demo_block_only_without_manifest():
    demo = config.load("abmil")
    real = config.load("abmil", ["data.manifest=m.csv"])
    assert demo.data.is_demo and not real.data.is_demo
    assert demo.features.backbone == "demo_cnn"
    assert real.features.backbone == "resnet50_trunc"
    # CLI overrides win over the demo block
    assert config.load("abmil", ["trainer.max_epochs=3"]).trainer.max_epochs == 3


def test_method_switch_drops_other_method_keys():
    cfg = config.load("mean_pool")
    assert set(cfg.method) == {"name", "embed_dim", "dropout"}
    cfg = config.load("abmil", ["method.name=max_pool"])
    assert dict(cfg.method) == {"name": "max_pool"}


def test_extends_one_level_only(tmp_path: Path):
    exp = config.experiments_dir()
    (tmp_path / "_base.yaml").write_text((exp / "_base.yaml").read_text())
    (tmp_path / "a.yaml").write_text("method: {name: abmil}\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    (tmp_path / "c.yaml").write_text("extends: b\n")
    assert config.load("b", root=tmp_path).method.name == "abmil"
    with pytest.raises(ConfigError, match="only one level"):
        config.load("c", root=tmp_path)
    (tmp_path / "d.yaml").write_text("trainer: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"d\.yaml"):
        config.load("d", root=tmp_path)


def test_save_resolved(tmp_path: Path):
    cfg = config.load("abmil")
    path = config.save_resolved(cfg, tmp_path)
    again = OmegaConf.load(path)
    assert again.method.name == "abmil" and "${" not in path.read_text()


def test_demo_folders_differ_by_task_size_and_seed(tmp_path):
    from wsi_lightning.build import demo_dir, demo_folder

    assert demo_folder("data") == Path("data/demo")  # the default set keeps its old folder
    assert demo_folder("data", "multiscale") == Path("data/demo-multiscale")
    assert demo_folder("d", "multiscale", 200, 3) == Path("d/demo-multiscale-n200-seed3")
    cfg = config.load("cs_mil", ["data.demo.n_slides=200", f"data.root={tmp_path}"])
    assert demo_dir(cfg) == tmp_path / "demo-multiscale-n200"


@pytest.mark.parametrize("override, key, expected", [
    ("trainer.max_epochs=abc", "trainer.max_epochs", "an integer"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs", "an integer"),
    ("optim.lr=abc", "optim.lr", "a number"),
    ("data.standardize=1", "data.standardize", "true/false"),
    ("tiling.multiscale.context=4", "tiling.multiscale.context", "a list"),
    ("method.embed_dim=abc", "method.embed_dim", "an integer"),
    ("method.gated=yes please", "method.gated", "true/false"),
])
def test_wrong_types_fail_at_load_naming_key_value_and_type(override: str, key: str, expected: str):
    """Used to fail only after data preparation, with a raw ValueError."""
    from wsi_lightning import build

    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' = .*expected {expected}"):
        build.method_kwargs(config.load("abmil", [override]))


def test_types_that_keys_legitimately_take_pass():
    from wsi_lightning import build

    for o in ["trainer.devices=2", "trainer.devices=auto", "trainer.precision=16", "optim.lr=1",
              "data.split.fold=2", "monitor.patience=3", "data.max_bag_size=100"]:
        build.method_kwargs(config.load("abmil", [o]))
    build.method_kwargs(config.load("magnet_3layer", ["method.grey_tol=null", "method.patches=[2, 2]",
                                                      "method.tanh_on=expectation"]))


def test_callback_argument_types_are_checked(tmp_path: Path):
    from wsi_lightning import build

    cfg = config.load("abmil", ["callbacks=[{name: attention_logger, max_slides: abc}]"])
    with pytest.raises(ConfigError, match=r"max_slides.*'abc'.*expected an integer or null"):
        build.build_callbacks(cfg, tmp_path)


@pytest.mark.parametrize("text, fragment", [
    ("method:\n  name: abmil\n  embed_dim: [1, 2\n", "not valid YAML"),
    ("method: !!python/object/apply:os.system ['echo pwned']\n", "no !!python tags"),
])
def test_yaml_errors_and_python_tags_are_named_config_errors(tmp_path: Path, text: str, fragment: str):
    exp = tmp_path / "bad.yaml"
    exp.write_text(text)
    with pytest.raises(ConfigError, match=rf"bad.yaml.*{re.escape(fragment)}"):
        config.load(str(exp))


@pytest.mark.parametrize("exp, override, fix", [
    ("abmil", "method.name=cs_mil", "set tiling.multiscale.mode to one of ['concentric']"),
    ("abmil", "method.name=hag_mil", "set tiling.multiscale.mode to one of ['quadtree']"),
    ("cs_mil", "method.name=abmil", "needs data.multiscale.mode=select"),
    ("hag_mil", "data.quadtree.level=-1", r"reads every level; the config has data.quadtree.level=-1"),
    ("hag_mil", "method.name=abmil", r"reads one level; set data.quadtree.level"),
    ("hag_mil", "data.multiscale.mode=select", r"apply to concentric stores; on a quadtree store the view is data.quadtree.level"),
    ("cs_mil", "data.quadtree.level=0", r"applies to quadtree stores"),
])
def test_method_input_kind_and_data_config_must_agree_at_config_time(exp: str, override: str, fix: str):
    """A mismatched YAML used to fail inside forward, after the data work."""
    with pytest.raises(ConfigError, match=re.escape(fix)):
        build.method_kwargs(config.load(exp, [override]))
