"""A sweep's runs: seeds and value lists expanded into ordinary ``mbrl run`` commands.

``mbrl sweep pets --env cartpole-balance --seeds 0-3 horizon=10,20 planner.population=100``
varies ``horizon`` over two values and the seed over four: eight runs, each an ordinary run
folder named after what varies (``pets-cartpole-balance-horizon10-seed3``), in two settings
(``pets horizon=10``, ``pets horizon=20``) whose runs share their seeds. Several algorithms
(``mbrl sweep mba,naf --preset '{algo}_pendulum'``) are one more varying key. Every run's
command is checked exactly as ``mbrl run`` checks it (``--show-config``, which writes nothing)
before the sweep's folder exists, so a bad key or value is refused up front with its setting.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import yaml

SEEDS_HELP = "0-9, 0,2,5 or mixed (0-3,7)"
ALGO_PLACEHOLDER = "{algo}"
"""In ``--preset`` or ``--config``: the algorithm's name (``-`` written ``_`` in a preset name)."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep.

    Fields:
        name: its run folder's name inside the sweep folder
            (``pets-cartpole-balance-horizon10-seed3``).
        setting: what the run shares with the other seeds of its setting, as a label: the
            algorithm, then every varying ``key=value`` (``pets horizon=10``).
        algo: the algorithm.
        env: the env of its resolved config.
        seed: the run's seed.
        argv: its ``mbrl run`` arguments without ``--runs-dir`` and ``--name``
            (``("run", "pets", "--env", "cartpole-balance", "--seed", "3", "horizon=10")``).
    """

    name: str
    setting: str
    algo: str
    env: str
    seed: int
    argv: tuple[str, ...]


def parse_seeds(text: str) -> tuple[int, ...]:
    """The seeds of ``--seeds``: ranges ``a-b`` (both ends included) and single seeds, comma
    separated (``0-9``, ``0,2,5``, ``0-3,7,10-12``), in the order given.

    Raises:
        ValueError: an empty list, an item that is not a seed or a rising range, a seed
            outside [0, 2**32), or a seed given twice.
    """
    seeds: list[int] = []
    for item in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if m is None:
            raise ValueError(
                f"--seeds {text!r}: {item.strip()!r} is not a seed or a range a-b of seeds >= 0; "
                f"write {SEEDS_HELP}"
            )
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ValueError(f"--seeds {text!r}: the range {lo}-{hi} goes down; write {hi}-{lo}")
        seeds.extend(range(lo, hi + 1))
    if max(seeds) >= 2**32:
        raise ValueError(f"--seeds {text!r}: seeds must be below 2**32, got {max(seeds)}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(
            f"--seeds {text!r} gives seed(s) {', '.join(map(str, twice))} more than once; "
            "give each seed once"
        )
    return tuple(seeds)


def split_values(override: str) -> tuple[str, tuple[str, ...]]:
    """``key=a,b,c`` as ``("key", ("a", "b", "c"))``: the values split at commas outside
    brackets and quotes, so ``key=[1,2],[3,4]`` is two list values and ``key="a,b"`` one
    string. A single value is a one-item tuple.

    Raises:
        ValueError: not ``key=value``, or an empty value in a list (``key=a,,b``).
    """
    key, sep, raw = override.partition("=")
    if not sep or not key.strip() or key.startswith("-"):
        raise ValueError(f"override {override!r} is not of the form key=value or key=a,b,...")
    values, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(raw):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    if len(values) > 1 and any(not v.strip() for v in values):
        raise ValueError(
            f"override {override!r} has an empty value in its list; write key=a,b (quote a "
            "value that holds a comma: key='\"a,b\"')"
        )
    return key.strip(), tuple(values)


def expand(
    algos: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    env: str | None = None,
    config: str | None = None,
    preset: str | None = None,
) -> tuple[RunSpec, ...]:
    """The runs of a sweep: every algorithm, every combination of the listed values of the
    ``overrides`` (``key=a,b``; a single value is the same in every run) and every seed, in
    that order (the seed varying fastest). ``config`` or ``preset`` may hold ``{algo}``.

    Each run's ``mbrl run`` command is checked as ``mbrl run ... --show-config`` checks it.

    Raises:
        ValueError: no algorithm or seed, ``seed=`` among the overrides, ``env=`` with
            ``--env``, a key listed twice, two runs with one folder name, or a run's command
            that ``mbrl run`` refuses (the message names the run's setting).
    """
    algos = list(dict.fromkeys(algos))
    if not algos or not seeds:
        raise ValueError("a sweep needs an algorithm and --seeds (e.g. --seeds 0-4)")
    fixed: list[str] = []
    varying: dict[str, tuple[str, ...]] = {}
    for item in overrides:
        key, values = split_values(item)
        if key == "seed":
            raise ValueError(f"override {item!r}: give the seeds with --seeds ({SEEDS_HELP})")
        if key == "env" and env is not None:
            raise ValueError(f"override {item!r} and --env {env}: give the env(s) one way")
        if key in varying or any(f.partition("=")[0].strip() == key for f in fixed):
            raise ValueError(f"config key {key} is given twice; list its values once: {key}=a,b")
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"override {item!r} lists {', '.join(twice)} twice; list each once")
        if len(values) > 1:
            varying[key] = values
        else:
            fixed.append(f"{key}={values[0]}")
    runs: list[RunSpec] = []
    for algo in algos:
        for combo in itertools.product(*varying.values()):
            chosen = [f"{k}={v}" for k, v in zip(varying, combo, strict=True)]
            setting = " ".join([algo, *chosen])
            for seed in seeds:
                argv = ["run", algo]
                argv += ["--env", env] if env is not None else []
                argv += _source_options(algo, config, preset)
                argv += ["--seed", str(seed), *fixed, *chosen]
                cfg = resolved_config(argv, setting)
                name = "-".join(
                    [algo, _env_part(cfg["env"]), *(_part(k, v) for k, v in _named(chosen))]
                )
                spec = RunSpec(f"{name}-seed{seed}", setting, algo, cfg["env"], seed, tuple(argv))
                runs.append(spec)
    names = [r.name for r in runs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(
            f"runs {', '.join(clash[:3])} would share a folder (values that differ only in "
            "characters a folder name cannot hold); make the listed values differ in letters "
            "or digits"
        )
    return tuple(runs)


def resolved_config(argv: Sequence[str], setting: str) -> dict:
    """The resolved config of the ``mbrl run`` command ``argv`` (``--show-config``: checks
    everything ``mbrl run`` checks before a run folder exists, and writes nothing).

    Raises:
        ValueError: ``mbrl run`` refuses the command; the message is its own, after
            ``setting``.
    """
    from mbrl import cli

    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main([*argv, "--show-config"])
    except SystemExit as e:  # argparse's own refusals
        code = e.code if isinstance(e.code, int) else 2
    if code != 0:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {code}"
        why = why.removeprefix("mbrl: error: ").removeprefix("mbrl run: error: ")
        raise ValueError(f"sweep setting {setting!r}: {why}")
    return yaml.safe_load(out.getvalue())


def _source_options(algo: str, config: str | None, preset: str | None) -> list[str]:
    if config is not None and preset is not None:
        raise ValueError("give --preset or --config, not both")
    if preset is not None:
        return ["--preset", preset.replace(ALGO_PLACEHOLDER, algo.replace("-", "_"))]
    if config is not None:
        path = Path(config.replace(ALGO_PLACEHOLDER, algo))
        return ["--config", str(path.resolve() if path.exists() else path)]
    return []


def _named(chosen: Sequence[str]) -> list[tuple[str, str]]:
    """The varying ``key=value`` parts that go into a run's name (the env is named already)."""
    pairs = [tuple(c.split("=", 1)) for c in chosen]
    return [(k, v) for k, v in pairs if k != "env"]


def default_name(runs: Sequence[RunSpec]) -> str:
    """A sweep's name when ``--name`` is not given: its algorithms and envs
    (``pets-cartpole-balance``, ``mba-naf-Pendulum-v1``)."""
    algos = dict.fromkeys(r.algo for r in runs)
    envs = dict.fromkeys(_env_part(r.env) for r in runs)
    return "-".join([*algos, *envs])


def _env_part(env: str) -> str:
    from mbrl.envs.gym_env import folder_name

    return folder_name(env)


def _part(key: str, value: str) -> str:
    """``horizon10``, ``planner.population200``: a key and its value as a folder-name part."""
    text = key + value.strip().strip("'\"")
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)
