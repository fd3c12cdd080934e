"""Build step of the wheel: the preset configs ``experiments/*.yaml`` go into the package as
``mbrl/preset_files/*.yaml`` (read by :mod:`mbrl.presets`), without the benchmark scripts
beside them. ``experiments/`` stays the only copy in the source tree; everything else is in
pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithPresets(build_py):
    """``build_py`` that also copies ``experiments/*.yaml`` into ``mbrl/preset_files/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads experiments/
            return
        presets = sorted(ROOT.glob("experiments/*.yaml"))
        if not presets:
            raise SystemExit("setup.py: no experiments/*.yaml to ship as presets")
        out = Path(self.build_lib) / "mbrl" / "preset_files"
        self.mkpath(str(out))
        for path in presets:
            self.copy_file(str(path), str(out / path.name))


setup(cmdclass={"build_py": BuildPyWithPresets})
