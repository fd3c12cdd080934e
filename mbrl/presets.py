"""Presets: the benchmark configs of ``experiments/*.yaml`` by name, also in an installed package.

A preset's name is its file's stem (``pets_cartpole``), its algorithm the longest algorithm name
the stem starts with (``gp_mpc_pendulum`` is for ``gp-mpc``), its summary the gist of its first
comment line. ``mbrl run ALGO --preset NAME`` loads it like ``--config``; ``mbrl presets``
lists them.

``experiments/`` is the only copy in the source tree: a source checkout (or editable install)
reads the files there, and building the wheel copies them into the package as
``mbrl/preset_files/*.yaml`` (``setup.py``), without the benchmark scripts beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mbrl import algorithms


@dataclass(frozen=True)
class Preset:
    """One preset config file."""

    name: str  # the file stem, "pets_cartpole"
    algorithm: str  # the algorithm it configures, "pets"
    path: Path
    summary: str  # the gist of the file's first comment line


def folder() -> Path:
    """Where the preset files are: the checkout's ``experiments/`` when running from a source
    tree, else the installed package's ``preset_files/``."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "experiments").is_dir():
        return checkout / "experiments"
    return Path(str(resources.files("mbrl") / "preset_files"))


def presets() -> list[Preset]:
    """Every preset, sorted by name."""
    found = []
    for path in sorted(folder().glob("*.yaml")):
        found.append(Preset(path.stem, algorithm_of(path.stem), path, _summary(path)))
    return found


def get(name: str) -> Preset:
    """The preset called ``name`` (a file stem; a trailing ``.yaml`` is allowed).

    Raises:
        KeyError: no such preset; the message lists them.
    """
    stem = name.removesuffix(".yaml")
    for preset in presets():
        if preset.name == stem:
            return preset
    valid = ", ".join(p.name for p in presets()) or f"none (no *.yaml in {folder()})"
    raise KeyError(f"unknown preset {name!r}; valid names: {valid} (see `mbrl presets`)")


def algorithm_of(stem: str) -> str:
    """The algorithm a preset file stem is for: ``mve_pendulum`` -> ``mve``,
    ``gp_mpc_pendulum`` -> ``gp-mpc``.

    Raises:
        ValueError: the stem starts with no algorithm name.
    """
    dashed = stem.replace("_", "-")
    names = [n for n in algorithms.ALGORITHMS if dashed.startswith(n + "-")]
    if not names:
        valid = ", ".join(algorithms.ALGORITHMS)
        raise ValueError(
            f"preset {stem!r} does not start with an algorithm name ({valid}); name it "
            "ALGO_TASK.yaml"
        )
    return max(names, key=len)


def _summary(path: Path) -> str:
    """The first comment line, up to its first top-level ``: `` or ``. `` and without an
    unclosed parenthesis."""
    first = ""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            first = line.lstrip("#").strip()
            break
    depth, cut, opened = 0, len(first), []
    for i, c in enumerate(first):
        if c == "(":
            depth += 1
            opened.append(i)
        elif c == ")" and depth:
            depth -= 1
            opened.pop()
        elif c in ":." and depth == 0 and first[i + 1 : i + 2] in (" ", ""):
            cut = i
            break
    text = first[:cut]
    if opened and opened[0] < cut:
        text = first[: opened[0]]
    return text.strip().rstrip(",;")
