"""mkdocs hook: a tree that imports like the installed package, for the API pages.

pyproject maps ``mbrl.dynamics`` to ``dynamics/`` (and so on), which a static reader of the
source cannot know; this links ``build/docs-src/mbrl/`` to ``mbrl/`` plus the four mapped
folders, and mkdocstrings reads the docstrings from there.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("dynamics", "planners", "control", "envs")


def on_startup(command: str, dirty: bool) -> None:
    package = ROOT / "build" / "docs-src" / "mbrl"
    package.mkdir(parents=True, exist_ok=True)
    links = {p.name: p for p in (ROOT / "mbrl").iterdir() if p.name != "__pycache__"}
    links.update({name: ROOT / name for name in MAPPED})
    for old in package.iterdir():
        if old.is_symlink() and old.name not in links:
            old.unlink()
    for name, target in links.items():
        link = package / name
        if not link.is_symlink():
            link.symlink_to(target)
