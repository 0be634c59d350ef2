"""Bad input through the CLI: exit code 2, a message naming the key / file / row and the fix,
no data work started and nothing written outside the output folders."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import feature_cfg_overrides
from wsi_lightning.cli import main


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("override, named", [
    ("trainer.max_epochs=abc", "'trainer.max_epochs' = 'abc' (str); expected an integer"),
    ("optim.lr=abc", "'optim.lr' = 'abc' (str); expected a number"),
    ("method.embed_dim=[1, 2]", "'method.embed_dim' = [1, 2] (list); expected an integer"),
])
def test_wrong_types_stop_before_any_data_work(override: str, named: str, tmp_path: Path, monkeypatch, caplog):
    """Wrong types used to fail only after data preparation, with a raw ValueError."""
    import wsi_lightning.build as build

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build, "build_datamodule", lambda *a, **k: pytest.fail("data work started"))
    with caplog.at_level(logging.ERROR):
        assert main(["fit", "abmil", override, f"paths.runs={tmp_path / 'runs'}"]) == 2
    assert named in caplog.text
    assert _files(tmp_path) == set()


def test_invalid_yaml_experiment_is_named(tmp_path: Path, caplog):
    exp = tmp_path / "mine.yaml"
    exp.write_text("method:\n  name: abmil\n  gated: [true\n")
    with caplog.at_level(logging.ERROR):
        assert main(["fit", str(exp)]) == 2
    assert "mine.yaml" in caplog.text and "not valid YAML" in caplog.text and "line" in caplog.text


class _Payload:
    def __reduce__(self):
        return (Path.write_text, (Path(os.environ["WSI_TEST_MARKER"]), "pwned"))


def test_test_refuses_a_pickled_payload_checkpoint_even_with_the_env_override(
        bag_data: Path, tmp_path: Path, monkeypatch, caplog):
    """`wsi test` loads checkpoints with weights_only=True explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
    (which makes torch's *default* unsafe) cannot turn a checkpoint into code execution."""
    assert main(["fit", "abmil", *feature_cfg_overrides(bag_data, tmp_path / "runs")]) == 0
    run_dir = next((tmp_path / "runs" / "abmil").iterdir())
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    marker = tmp_path / "marker"
    monkeypatch.setenv("WSI_TEST_MARKER", str(marker))
    state = torch.load(ckpt, weights_only=True)
    state["evil"] = _Payload()
    torch.save(state, ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        main(["test", str(run_dir)])
    assert not marker.exists()


def test_unsafe_slide_id_writes_nothing_outside(bag_data: Path, tmp_path: Path, caplog):
    df = pd.read_csv(bag_data)
    df.loc[0, "slide_id"] = "../../escaped"
    bad = bag_data.parent / "bad.csv"
    df.to_csv(bad, index=False)
    before = _files(tmp_path.parent)
    with caplog.at_level(logging.ERROR):
        assert main(["fit", "abmil", *feature_cfg_overrides(bad, tmp_path / "runs")]) == 2
    assert "invalid slide id '../../escaped'" in caplog.text and "row 1" in caplog.text
    assert {p for p in _files(tmp_path.parent) - before if tmp_path not in p.parents} == set()
