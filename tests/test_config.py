from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from wsi_lightning import build, config
from wsi_lightning.errors import ConfigError


def test_every_experiment_loads_and_builds_its_method():
    from wsi_lightning.methods.patch_baselines import PatchBaseline

    names = config.list_experiments()
    assert "abmil" in names
    for name in names:
        for demo in (True, False):
            cfg = config.load(name, demo=demo)
            assert cfg.name == name
            cls, kwargs = build.method_kwargs(cfg)
            if cls is PatchBaseline:  # two-step scikit-learn baselines: no torch parameters
                PatchBaseline(**kwargs)
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
