"""README "Adding a paper": the walk-through's method file and YAML, run as written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tests.conftest import REPO, feature_cfg_overrides
from wsi_lightning import build, config, run
from wsi_lightning.registry import METHODS


def _blocks(lang: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Adding a paper"):]
    section = section[: section.index("\n## ", 5)]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_the_walkthrough_method_trains_from_two_files(bag_data: Path, tmp_path: Path):
    method_src, yaml_src = _blocks("python")[0], _blocks("yaml")[0]
    mod_path = tmp_path / "topk_mean.py"
    mod_path.write_text(method_src)
    (tmp_path / "topk_mean.yaml").write_text(yaml_src)
    build.import_registered()
    spec = importlib.util.spec_from_file_location("topk_mean_walkthrough", mod_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # registers "topk_mean"
        cfg = config.load(str(tmp_path / "topk_mean.yaml"), feature_cfg_overrides(bag_data, tmp_path / "runs"))
        assert build.method_kwargs(cfg)[0] is module.TopKMean
        res = run.fit(cfg)
        assert 0.0 <= res.metrics["test/auroc"] <= 1.0
        assert (res.run_dir / "test_predictions.csv").exists()
    finally:
        METHODS._items.pop("topk_mean", None)  # noqa: SLF001 - keep the registry as the suite found it
