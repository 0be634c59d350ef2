"""Configuration: ``_base.yaml`` <- experiment YAML (one level of ``extends``) <- CLI overrides.

Every key must exist in ``experiments/_base.yaml``; an unknown key fails with the list of valid
keys at that level. Two sections are open: ``method`` (checked against the method's signature
by ``build.py``) and ``demo`` (overrides, checked like the rest when applied). The ``callbacks``
list holds ``{name: ..., <arguments>}`` entries, checked by ``build.py``.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wsi_lightning.errors import ConfigError

log = logging.getLogger(__name__)

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
OPEN_SECTIONS = ("method", "demo", "features.backbone_args")  # keys not checked against _base.yaml


def experiments_dir() -> Path:
    return EXPERIMENTS_DIR


def list_experiments(root: Path | None = None) -> list[str]:
    root = root or experiments_dir()
    return sorted(p.stem for p in root.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:  # syntax errors, and tags such as !!python/... (never executed)
        raise ConfigError(f"cannot read config {path}: not valid YAML ({e}); fix the file at the "
                          "line shown (plain YAML only: no !!python tags)") from e
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return cfg


def check_keys(base: Any, cfg: Any, where: str, prefix: str = "") -> None:
    """Raise ConfigError if ``cfg`` has a key that ``base`` does not (recursively).

    Args:
        base: the reference mapping (from ``_base.yaml``).
        cfg: the mapping to check.
        where: where ``cfg`` came from, for the message (a file or "command line").
        prefix: dotted path of ``cfg`` inside the whole config.
    """
    if not isinstance(cfg, DictConfig) or not isinstance(base, DictConfig):
        return
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in base:
            valid = sorted(str(k) for k in base.keys())
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{dotted}' in {where}{hint}; valid keys"
                f"{' under ' + repr(prefix[:-1]) if prefix else ''}: {valid}"
            )
        if dotted in OPEN_SECTIONS:
            continue
        sub_base = base._get_node(key)  # noqa: SLF001 - avoid resolving interpolations
        sub_cfg = cfg._get_node(key)  # noqa: SLF001
        if isinstance(sub_base, DictConfig) and isinstance(sub_cfg, DictConfig):
            check_keys(sub_base, sub_cfg, where, f"{dotted}.")


def _exp_path(name_or_path: str, root: Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = root / f"{name_or_path}.yaml"
    if not cand.exists():
        raise ConfigError(
            f"unknown experiment '{name_or_path}' (no {cand}); available: {list_experiments(root)}"
        )
    return cand


def _load_experiment(path: Path, root: Path, base: DictConfig) -> DictConfig:
    exp = _read_yaml(path)
    parent_name = exp.get("extends")
    if parent_name:
        parent_path = _exp_path(str(parent_name), root)
        parent = _read_yaml(parent_path)
        if parent.get("extends"):
            raise ConfigError(
                f"{path}: extends '{parent_name}', which itself extends "
                f"'{parent.extends}'; only one level of extends is allowed"
            )
        check_keys(base, parent, str(parent_path))
        exp = _merge(parent, exp)
    check_keys(base, exp, str(path))
    return exp


def _merge(*cfgs: DictConfig) -> DictConfig:
    """Merge configs left to right (lists are replaced whole). A later ``method.name`` that
    differs from the earlier one replaces the whole ``method`` section: arguments of one
    method never leak into another."""
    out = OmegaConf.create({})
    for c in cfgs:
        new_name = OmegaConf.select(c, "method.name", default=None)
        old_name = OmegaConf.select(out, "method.name", default=None)
        if new_name is not None and old_name is not None and new_name != old_name:
            out.method = OmegaConf.create({})
        out = OmegaConf.merge(out, c)
    return out  # type: ignore[return-value]


def check_override(item: Any, where: str = "") -> None:
    """``item`` is a ``key=value`` string, else a ConfigError naming ``where`` it came from."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{where + ' has ' if where else ''}override {item!r}, which is not a 'key=value' "
                          "string (e.g. trainer.max_epochs=5); quote overrides whose value holds YAML "
                          "syntax, e.g. \"callbacks=[{name: mechanism}]\"")


def parse_overrides(overrides: list[str] | None) -> DictConfig:
    """``["a.b=1", "c=x"]`` -> DictConfig; values parsed as YAML."""
    overrides = list(overrides or [])
    for o in overrides:
        check_override(o)
    try:
        return OmegaConf.from_dotlist(overrides)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}; values are plain YAML "
                          "(quote lists and mappings: 'callbacks=[{name: mechanism}]')") from e


def load(
    exp: str,
    overrides: list[str] | None = None,
    root: Path | None = None,
    demo: bool | None = None,
) -> DictConfig:
    """Load an experiment config.

    Args:
        exp: experiment name (``experiments/<exp>.yaml``) or a path to a YAML file.
        overrides: CLI ``key=value`` strings, applied last.
        root: experiments folder (default: the repository's ``experiments/``).
        demo: force demo mode on/off; default: on when ``data.manifest`` is null.

    Returns:
        The merged config. In demo mode the experiment's ``demo:`` block has been applied
        (before the CLI overrides) and ``data.is_demo`` is true.
    """
    root = root or experiments_dir()
    base_path = root / "_base.yaml"
    base = _read_yaml(base_path)
    path = _exp_path(exp, root)
    exp_cfg = _load_experiment(path, root, base)
    cli = parse_overrides(overrides)
    check_keys(base, cli, "command-line overrides")

    cfg = _merge(base, exp_cfg)
    manifest = OmegaConf.select(_merge(cfg, cli), "data.manifest")
    is_demo = (manifest is None) if demo is None else demo
    demo_block = cfg.get("demo") or OmegaConf.create({})
    if is_demo and len(demo_block):
        check_keys(base, demo_block, f"{path} (demo: block)")
        log.info(
            "running on the built-in synthetic demo data: applying the demo overrides of %s: %s",
            path.name,
            OmegaConf.to_container(demo_block),
        )
        cfg = _merge(cfg, demo_block)
    cfg = _merge(cfg, cli)
    if cfg.get("name") is None:
        cfg.name = path.stem
    cfg.extends = None
    OmegaConf.set_struct(cfg, False)
    cfg.data.is_demo = bool(is_demo)
    check_types(base, cfg)
    _validate_values(cfg)
    return cfg


# keys whose _base.yaml default does not say every type they take
TYPES_ALLOWED: dict[str, tuple[type, ...]] = {
    "trainer.devices": (int, str, list),  # 2 | "auto" | "0,1" | [0, 1]
    "trainer.precision": (str, int),  # "32-true" | 16
    "trainer.gradient_clip_val": (int, float, type(None)),
    "data.sampling.image_size": (int, list),  # one side, or several (slide mode)
    "data.sampling.patch_mpp": (int, float, type(None)),  # null: the slide's top resolution
    "data.multiscale.sampling.per_cluster": (int, type(None)),
    "data.quadtree.level": (int, type(None)),
    "data.split.fold": (int, str, type(None)),
    "data.classes": (list, dict, type(None)),
    "tiling.multiscale.min_child_tissue": (int, float, type(None)),
}
_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping", type(None): "null"}


def allowed_types(default: Any) -> tuple[type, ...] | None:
    """The types a key whose default is ``default`` accepts (None: any)."""
    if default is None:
        return None
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, str):
        return (str,)
    if isinstance(default, list):
        return (list,)
    if isinstance(default, dict):
        return (dict,)
    return None


def check_types(base: DictConfig, cfg: DictConfig) -> None:
    """Raise ConfigError naming the key, the value and the expected type when a value's type
    differs from its ``_base.yaml`` default's (``TYPES_ALLOWED`` lists the keys that take
    several). Runs when a config is loaded, before any data is generated or extracted.
    Method and callback arguments are checked against their signatures' defaults by
    ``build.method_kwargs`` / ``build.build_callbacks``."""
    plain_base = OmegaConf.to_container(base, resolve=False)
    plain = OmegaConf.to_container(cfg, resolve=False)

    def walk(b: Any, c: Any, prefix: str) -> None:
        for key, default in b.items():
            dotted = f"{prefix}{key}"
            if not isinstance(c, dict) or key not in c or dotted in OPEN_SECTIONS:
                continue
            value = c[key]
            if isinstance(default, dict) and isinstance(value, dict):
                walk(default, value, f"{dotted}.")
                continue
            if isinstance(value, str) and "${" in value:  # an interpolation: checked once resolved
                continue
            check_value(dotted, value, TYPES_ALLOWED.get(dotted) or allowed_types(default))

    walk(plain_base, plain, "")


def check_value(key: str, value: Any, allowed: tuple[type, ...] | None) -> None:
    """``value`` of config key ``key`` is one of ``allowed`` types (bool is not an integer)."""
    if allowed is None:
        return
    ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in allowed)
    if not ok:
        names = [_TYPE_NAMES.get(t, t.__name__) for t in allowed if not (t is int and float in allowed)]
        first = float if float in allowed else allowed[0]
        raise ConfigError(f"config key '{key}' = {value!r} ({type(value).__name__}); expected "
                          f"{' or '.join(names)} (e.g. {key}={_example(first)})")


def _example(t: type) -> str:
    return {bool: "true", int: "5", float: "0.001", str: "name", list: "[1, 2]", dict: "{a: 1}"}.get(t, "null")


def _validate_values(cfg: DictConfig) -> None:
    choices = {
        "data.task": ("binary", "multiclass", "multitag"),
        "optim.name": ("adam", "adamw", "sgd"),
        "optim.scheduler": ("none", "cosine"),
        "monitor.mode": ("min", "max"),
        "logger.wandb.mode": ("offline", "online", "disabled"),
        "tiling.multiscale.mode": ("none", "concentric", "quadtree"),
        "data.multiscale.mode": ("stack", "select", "flatten", "sum", "concat"),
        "features.precision": ("fp32", "bf16", "fp16"),
        "data.bag_level": ("slide", "case"),
    }
    for key, allowed in choices.items():
        val = OmegaConf.select(cfg, key)
        if val not in allowed:
            raise ConfigError(f"config key '{key}' = {val!r}; expected one of {list(allowed)}")
    if not isinstance(cfg.method, DictConfig) or "name" not in cfg.method:
        raise ConfigError("config key 'method.name' is missing; e.g. method.name=abmil")
    if not isinstance(cfg.callbacks, ListConfig):
        raise ConfigError("config key 'callbacks' must be a list of {name: ...} entries")
    if cfg.data.task == "multitag" and not cfg.data.tag_cols:
        raise ConfigError("data.task=multitag needs data.tag_cols (a list of label columns)")


def save_resolved(cfg: DictConfig, run_dir: Path) -> Path:
    """Write ``config.resolved.yaml`` (interpolations resolved) into the run folder, atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.resolved.yaml"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)
    return path


# how a run executes, not what it computes: changing these neither redoes a finished table run
# nor is refused when a run is resumed
EXECUTION_KEYS = ("trainer.num_threads", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                  "data.num_workers", "features.num_workers", "features.batch_size", "features.devices",
                  "features.accelerator", "logger", "paths")


def changed_keys(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between two plain configs, except ``EXECUTION_KEYS``;
    keys the saved config lacks (added to _base.yaml since) are not changes."""
    key = prefix.rstrip(".")
    if key in EXECUTION_KEYS:
        return []
    if isinstance(saved, dict) and isinstance(now, dict):
        return [k for name in saved for k in changed_keys(saved[name], now.get(name, "<removed>"), f"{prefix}{name}.")]
    return [] if saved == now else [key]


def non_execution_keys(overrides: DictConfig) -> list[str]:
    """The dotted keys of parsed overrides that change what a run computes (not
    ``EXECUTION_KEYS``): what a resumed run or sweep must refuse."""

    def dotted(d: Any, prefix: str = "") -> list[str]:
        if isinstance(d, dict):
            return [k for name, v in d.items() for k in dotted(v, f"{prefix}{name}.")]
        return [prefix.rstrip(".")]

    return [k for k in dotted(OmegaConf.to_container(overrides)) if not is_execution_key(k)]


def is_execution_key(key: str) -> bool:
    """``trainer.num_threads`` or anything under ``logger`` / ``paths``: see ``EXECUTION_KEYS``."""
    return any(key == k or key.startswith(f"{k}.") for k in EXECUTION_KEYS)


def to_dict(cfg: DictConfig | ListConfig | Any) -> Any:
    """Resolved plain-Python container of a config node (or the value itself)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
