"""OpenSeadragon, the viewer's JavaScript: found where ``make install`` puts the npm package, or
where ``$WSI_OPENSEADRAGON`` says, and copied into every viewer folder (with its licence), so a
viewer opens with no network."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from wsi_lightning.errors import WSIError

log = logging.getLogger(__name__)

OPENSEADRAGON_VERSION = "6.1.1"  # the Makefile's OSD_VERSION (tests/test_viewer.py checks they agree)
ENV = "WSI_OPENSEADRAGON"
NPM_COMMAND = f"npm install --prefix .vendor openseadragon@{OPENSEADRAGON_VERSION} --no-audit --no-fund"
REPO = Path(__file__).resolve().parents[2]  # a source checkout; .vendor/ is beside wsi_lightning/
LICENSES = ("LICENSE.txt", "LICENSE", "LICENSE.md")


@dataclass(frozen=True)
class OpenSeadragon:
    """The files a viewer needs: ``openseadragon.min.js``, ``images/`` (button icons), the licence."""

    js: Path
    images: Path
    license: Path
    version: str


def _candidates() -> list[Path]:
    """Where to look: ``$WSI_OPENSEADRAGON`` alone when set, else the checkout's and the working
    folder's ``.vendor/node_modules/openseadragon``."""
    env = os.environ.get(ENV)
    if env:
        return [Path(env).expanduser()]
    rel = Path(".vendor") / "node_modules" / "openseadragon"
    return list(dict.fromkeys([REPO / rel, Path.cwd() / rel]))


def _resolve(root: Path) -> OpenSeadragon | None:
    """The files under ``root``: the npm package folder, its ``build/openseadragon/`` or any folder
    holding ``openseadragon.min.js`` and ``images/`` (the licence beside it or up to two above)."""
    for build in (root / "build" / "openseadragon", root):
        js, images = build / "openseadragon.min.js", build / "images"
        if js.is_file() and images.is_dir():
            lic = next((d / n for d in (build, build.parent, build.parent.parent) for n in LICENSES
                        if (d / n).is_file()), None)
            if lic is None:
                return None
            pkg = next((d / "package.json" for d in (build, build.parent, build.parent.parent)
                        if (d / "package.json").is_file()), None)
            try:
                version = str(json.loads(pkg.read_text()).get("version", "")) if pkg else ""
            except (OSError, ValueError):
                version = ""
            return OpenSeadragon(js, images, lic, version or "unknown")
    return None


def find_openseadragon() -> OpenSeadragon:
    """The installed OpenSeadragon; a WSIError saying how to install it when there is none."""
    tried = _candidates()
    for root in tried:
        found = _resolve(root)
        if found is not None:
            if found.version != OPENSEADRAGON_VERSION:
                log.warning("wsi view: OpenSeadragon %s in %s; this version is tested with %s (%s)",
                            found.version, root, OPENSEADRAGON_VERSION, NPM_COMMAND)
            return found
    where = ", ".join(str(p) for p in tried)
    if os.environ.get(ENV):
        raise WSIError(f"wsi view: ${ENV}={os.environ[ENV]} holds no OpenSeadragon (expected "
                       "openseadragon.min.js, images/ and LICENSE.txt there or in build/openseadragon/); "
                       f"point it at the npm package folder, or unset it and run `make install` ({NPM_COMMAND})")
    raise WSIError(f"wsi view: OpenSeadragon (the viewer's JavaScript) is not installed (looked in {where}); "
                   f"`make install` fetches it from the npm registry, or run `{NPM_COMMAND}` in the "
                   f"repository, or set ${ENV} to an openseadragon package folder")


def copy_openseadragon(osd: OpenSeadragon, dest: Path) -> None:
    """Copy the script, its images and its licence to ``dest`` (replaced whole, atomically)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        shutil.copy2(osd.js, tmp / "openseadragon.min.js")
        shutil.copytree(osd.images, tmp / "images")
        shutil.copy2(osd.license, tmp / "LICENSE.txt")
        (tmp / "VERSION").write_text(osd.version + "\n")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
