"""The package forms layers: each module imports only its own layer and those below, and no
import cycle exists, counting imports made inside functions (``if TYPE_CHECKING:`` blocks,
which never run, excepted)."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PKG = REPO / "wsi_lightning"

# bottom first; a module may import its own layer and any layer below
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("errors", "ids", "registry", "config", "manifest")),
    ("slides", ("slides",)),
    ("demo", ("demo",)),  # the synthetic data: slides + core only
    ("features", ("features",)),
    ("data", ("data",)),
    ("analysis", ("analysis",)),  # statistics, figures, interpretation
    ("nn", ("nn",)),
    ("methods", ("methods",)),
    ("callbacks", ("callbacks",)),
    ("app", ("build", "run", "outputs", "run_index", "qupath", "viewer", "reproduce", "sweep_space", "sweep", "cli", "__main__")),
]
LAYER_OF = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}
# the demo package is imported by the app layer only (build, CLI), not by the readers
DEMO_USERS = ("build", "cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """{module: wsi_lightning modules it imports anywhere (functions included)}."""
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = mod.split(".")[: len(mod.split(".")) - node.level + int(is_pkg)]
                    base = ".".join([*up, *([base] if base else [])])
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in paths and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in paths and t != mod and t.startswith("wsi_lightning"):
                    graph[mod].add(t)
    for mod in graph:  # importing a.b.c runs a/__init__ and a/b/__init__ too: not an edge of interest
        graph[mod] = {t for t in graph[mod] if not mod.startswith(t + ".")}
    return graph


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_every_module_has_a_layer():
    unknown = sorted({_part(m) for m in import_graph()} - set(LAYER_OF) - {"__init__"})
    assert unknown == [], f"add {unknown} to LAYERS"


def test_imports_go_down_the_layers():
    bad = []
    for mod, targets in import_graph().items():  # (cached: do not mutate)
        if _part(mod) == "__init__":
            continue
        for t in targets:
            if _part(t) == "__init__":
                continue
            if LAYER_OF[_part(t)] > LAYER_OF[_part(mod)]:
                bad.append(f"{mod} -> {t}")
            if _part(t) == "demo" and _part(mod) not in ("demo", *DEMO_USERS):
                bad.append(f"{mod} -> {t} (the demo data is the build's and the CLI's)")
    assert bad == []


@pytest.mark.parametrize("module, forbidden", [
    ("wsi_lightning.slides", "wsi_lightning.demo"),
    ("wsi_lightning.slides.reader", "wsi_lightning.demo"),
])
def test_importing_a_layer_loads_nothing_above_it(module: str, forbidden: str):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('{forbidden}')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_callbacks_read_only_typed_outputs():
    """Callbacks read MILOutput's typed fields (attention, tile_scores, cross_scale, tile_maps,
    roi_tree, aux_logits, stats), never a method's private ``extras`` keys."""
    offenders = []
    for path in sorted((PKG / "callbacks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "extras") or (
                    isinstance(node, ast.Constant) and node.value == "extras"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"callbacks reading MILOutput.extras: {offenders}"
