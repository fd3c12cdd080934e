"""Bad config values are refused while the config loads, naming the key, the value and the fix.

Every numeric field of every algorithm's config declares its range in its type; values out of
range, degenerate combinations, malformed YAML and a model fit that diverges all end in one
line that names what to change.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbrl import algorithms, cli
from mbrl.algorithms.dyna import DivergenceError, check_learner_stats
from mbrl.algorithms.factory import LearnerConfig, config_fit
from mbrl.config import ConfigError, Count, Positive, Range, load_config
from mbrl.dynamics import FitError

torch.set_num_threads(1)
CONFIG = settings(max_examples=150, deadline=None, database=None)


@dataclass(frozen=True)
class Leaf:
    """One numeric field of an algorithm's config, found by walking its type hints."""

    algo: str
    key: str  # dotted, as an override names it
    base: type  # int or float
    ranges: tuple[Range, ...]  # the Range markers of its type (empty: undeclared)
    optional: bool
    default: Any


def _unwrap(hint: Any) -> tuple[Any, bool, bool]:
    """``hint`` without ``| None`` and ``list[...]``: (inner hint, optional, is a list)."""
    optional = listed = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        (hint,) = args
    if typing.get_origin(hint) in (list, tuple):
        hint, listed = typing.get_args(hint)[0], True
    return hint, optional, listed


def _leaves(algo: str, cfg: Any, prefix: str = "") -> list[Leaf]:
    out = []
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out += _leaves(algo, value, key + ".")
            continue
        hint, optional, listed = _unwrap(hints[f.name])
        ranges: tuple[Range, ...] = ()
        if typing.get_origin(hint) is Annotated:
            hint, *meta = typing.get_args(hint)
            ranges = tuple(m for m in meta if isinstance(m, Range))
        if hint in (int, float):
            for i, v in enumerate(value) if listed else [(None, value)]:
                k = key if i is None else f"{key}[{i}]"
                out.append(Leaf(algo, k, hint, ranges, optional, v))
    return out


def _config(algo: str) -> type:
    return algorithms.get(algo).Config


LEAVES = [leaf for algo in algorithms.ALGORITHMS for leaf in _leaves(algo, _config(algo)())]
# keys whose in-range values a check across fields may still refuse (it names the key)
COUPLED = {
    "start_steps", "total_steps", "buffer_capacity", "seed_steps", "random_episodes",
    "replan_every", "particles", "model.batch_size", "model.val_fraction", "model.num_elites",
    "model.ensemble_size", "learner.batch_size", "branch.real_ratio", "branch.stop_after",
}  # fmt: skip


def _yaml(value: Any) -> str:
    """``value`` as YAML text (``.nan``, ``.inf`` for the non-finite floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _load(algo: str, key: str, value: Any, via_file: bool):
    """Load ``algo``'s config with ``key`` set to ``value``, by override or by a YAML file."""
    if not via_file:
        return load_config(_config(algo), None, [f"{key}={_yaml(value)}"])
    *parents, last = key.split(".")
    text = f"{last}: {_yaml(value)}\n"
    for part in reversed(parents):
        text = f"{part}:\n" + "".join(f"  {line}\n" for line in text.splitlines())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text)
        return load_config(_config(algo), path)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------- declared ranges


def test_the_walk_finds_the_numeric_fields():
    keys = {(leaf.algo, leaf.key) for leaf in LEAVES}
    assert {("pets", "model.lr"), ("mbpo", "branch.real_ratio"), ("gp-mpc", "model.lr")} <= keys
    assert ("sac", "learner.target_entropy") in keys and ("pets", "seed") in keys
    assert len(LEAVES) > 150


def test_walk_sees_optional_and_list_fields():
    @dataclass
    class Cfg:
        xs: list[Positive] = dataclasses.field(default_factory=lambda: [1.0, 2.0])
        n: Count | None = None
        m: int = 3

    leaves = {leaf.key: leaf for leaf in _leaves("x", Cfg())}
    assert set(leaves) == {"xs[0]", "xs[1]", "n", "m"}
    assert leaves["n"].optional and leaves["xs[1]"].ranges and not leaves["m"].ranges


@pytest.mark.parametrize("leaf", LEAVES, ids=[f"{x.algo}:{x.key}" for x in LEAVES])
def test_every_numeric_field_declares_a_range_its_default_satisfies(leaf):
    assert leaf.ranges, f"{leaf.algo} config field {leaf.key} declares no Range in its type"
    if leaf.default is None:
        assert leaf.optional
    else:
        assert type(leaf.default) is leaf.base, (leaf.key, leaf.default)
        assert all(leaf.default in r for r in leaf.ranges), (leaf.key, leaf.default)


def test_string_fields_with_choices_are_literals():
    """The only plain ``str`` field is the env name, checked against the registry."""
    for algo in algorithms.ALGORITHMS:
        stack = [_config(algo)()]
        while stack:
            cfg = stack.pop()
            for name, hint in typing.get_type_hints(type(cfg), include_extras=True).items():
                if name not in {f.name for f in dataclasses.fields(cfg)}:
                    continue
                value = getattr(cfg, name)
                if dataclasses.is_dataclass(value):
                    stack.append(value)
                elif isinstance(value, str):
                    assert typing.get_origin(hint) is Literal or name == "env", (algo, name)


def _outside(leaf: Leaf) -> st.SearchStrategy:
    """Values the field must refuse: non-finite floats, bools, values beyond either bound,
    and for integers non-integral numbers."""
    options = [st.sampled_from([math.nan, math.inf, -math.inf, True, False])]
    for r in leaf.ranges:
        if math.isfinite(r.lo):
            if leaf.base is int:
                top = int(r.lo) - 1 if not r.lo_open else int(r.lo)
                options.append(st.integers(max_value=top, min_value=top - 10**12))
            else:
                below = st.floats(max_value=r.lo, allow_nan=False, allow_infinity=False)
                options.append(below.filter(lambda x, r=r: x <= r.lo if r.lo_open else x < r.lo))
        if math.isfinite(r.hi):
            if leaf.base is int:
                low = int(r.hi) if r.hi_open else int(r.hi) + 1
                options.append(st.integers(min_value=low, max_value=low + 10**30))
            else:
                above = st.floats(min_value=r.hi, allow_nan=False, allow_infinity=False)
                options.append(above.filter(lambda x, r=r: x >= r.hi if r.hi_open else x > r.hi))
    if leaf.base is int:
        options.append(st.floats(-1e6, 1e6).filter(lambda x: not float(x).is_integer()))
    return st.one_of(options)


def _inside(leaf: Leaf) -> st.SearchStrategy:
    (r,) = leaf.ranges
    if leaf.base is int:
        lo = int(r.lo) + r.lo_open if math.isfinite(r.lo) else -(10**9)
        hi = int(r.hi) - r.hi_open if math.isfinite(r.hi) else lo + 10**9
        return st.integers(lo, hi)
    return st.floats(
        min_value=r.lo if math.isfinite(r.lo) else None,
        max_value=r.hi if math.isfinite(r.hi) else None,
        exclude_min=r.lo_open,
        exclude_max=r.hi_open,
        allow_nan=False,
        allow_infinity=False,
    )


@CONFIG
@given(data=st.data(), via_file=st.booleans())
def test_out_of_range_values_are_refused_naming_the_key(data, via_file):
    leaf = data.draw(st.sampled_from(LEAVES), label="field")
    value = data.draw(_outside(leaf), label="value")
    with pytest.raises(ConfigError) as e:
        _load(leaf.algo, leaf.key, value, via_file)
    message = str(e.value)
    assert leaf.key in message and "\n" not in message


@CONFIG
@given(data=st.data(), via_file=st.booleans())
def test_in_range_values_are_accepted(data, via_file):
    leaf = data.draw(st.sampled_from(LEAVES), label="field")
    value = data.draw(_inside(leaf), label="value")
    try:
        cfg = _load(leaf.algo, leaf.key, value, via_file)
    except ConfigError as e:
        # only a check across fields may refuse an in-range value, and it names the key
        assert leaf.key in COUPLED and leaf.key in str(e), str(e)
        assert f"{leaf.key} must be" not in str(e), str(e)
    else:
        assert _get(cfg, leaf.key) == value


@pytest.mark.parametrize("leaf", [x for x in LEAVES if x.optional], ids=lambda x: x.key)
def test_optional_fields_accept_null(leaf):
    assert _get(load_config(_config(leaf.algo), None, [f"{leaf.key}=null"]), leaf.key) is None


def test_a_config_built_in_code_is_checked_too():
    mbpo = algorithms.get("mbpo")
    with pytest.raises(ConfigError, match=r"branch.rollout_batch_size must be an integer >= 1"):
        mbpo.Config(branch=mbpo.BranchConfig(rollout_batch_size=0))
    with pytest.raises(ConfigError, match=r"learner.lr must be > 0 and finite, got inf"):
        mbpo.Config(learner=LearnerConfig(lr=math.inf))


# ----------------------------------------------------------------------------- degenerate values


@pytest.mark.parametrize(
    "algo, overrides, message",
    [
        ("sac", ["eval_episodes=0"], "eval_episodes must be an integer >= 1, got 0"),
        ("mbpo", ["branch.rollout_batch_size=0"], "branch.rollout_batch_size must be an integer"),
        ("mbpo", ["branch.max_length=0"], "branch.max_length must be an integer >= 1"),
        ("pets", ["trials=-1"], "trials must be an integer >= 0, got -1"),
        ("td3", ["start_steps=-5"], "start_steps must be an integer >= 0, got -5"),
        ("mbpo", ["branch.real_ratio=1.5"], "branch.real_ratio must be in [0, 1), got 1.5"),
        ("mbpo", ["branch.real_ratio=1"], "branch.real_ratio must be in [0, 1), got 1.0"),
        ("mbpo", ["branch.real_ratio=0.999"], "leaves no imagined transition"),
        ("mbpo", ["learner.batch_size=16", "branch.real_ratio=0.01"], "leaves no real"),
        ("mbpo", ["updates_per_step=0"], "updates_per_step must be an integer >= 1"),
        ("mbpo", ["start_steps=5000"], "start_steps=5000 is not below total_steps=5000"),
        ("mbpo", ["model.num_elites=8"], "model.num_elites=8 exceeds model.ensemble_size=7"),
        ("pets", ["particles=7"], "particles=7 is not a multiple of the 5 elites"),
        ("pets", ["model.propagation=expectation"], "10 identical mean trajectories"),
        ("gp-mpc", ["particles=4"], "particles=4 with model.propagation=expectation"),
        ("pets", ["horizon=0"], "horizon must be an integer >= 1, got 0"),
        ("pets", ["replan_every=20"], "replan_every=20 exceeds horizon=15"),
        ("pets", ["seed_steps=0", "random_episodes=0"], "leave the first model fit without data"),
        ("pets", ["buffer_capacity=100"], "seed_steps=200 exceeds buffer_capacity=100"),
        ("mve", ["mve.horizon=0"], "mve.horizon must be an integer >= 1, got 0"),
        ("sac", ["seed=4294967296"], "seed must be an integer in [0, 4294967296)"),
        ("gp-mpc", ["seed=-1"], "seed must be an integer in [0, 4294967296), got -1"),
        ("pets", ["seed=1e30"], "seed must be an integer in [0, 4294967296)"),
        ("sac", ["learner.gamma=1.01"], "learner.gamma must be in [0, 1], got 1.01"),
        ("sac", ["learner.tau=0"], "learner.tau must be in (0, 1], got 0.0"),
        ("pets", ["model.weight_decay=.nan"], "model.weight_decay must be >= 0 and finite"),
        ("pets", ["model.lr=inf"], "model.lr must be > 0 and finite, got inf"),
        ("pets", ["planner.population_decay=0.5"], "planner.population_decay must be >= 1"),
        ("mbpo", ["total_steps=true"], "total_steps: expected an integer, got True"),
        ("mbpo", ["learner.lr=false"], "learner.lr: expected a number, got False"),
        ("mbpo", ["total_steps=2.5"], "total_steps: expected an integer, got 2.5"),
        ("sac", ["env=nope"], "unknown env 'nope'; valid names: "),
        ("pets", ["env=gym:Pendulum-v1?bad=1"], "'bad=1' is not an option; valid: "),
        ("pets", ["model.planning_dtype=float16"], "valid: float32, bfloat16"),
        ("mbpo", ["model.train_every=0"], "model.train_every=0: refit the model every n >= 1"),
        ("mba", ["branch.rollout_every=0"], "branch.rollout_every=0: branch every n >= 1"),
    ],
)
def test_degenerate_values_are_refused(algo, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(_config(algo), None, overrides)
    assert message in str(e.value)


def test_gym_env_names_load_without_building_the_env():
    assert load_config(_config("pets"), None, ["env=gym:Pendulum-v1"]).env == "gym:Pendulum-v1"


def test_integral_numbers_load_into_integer_fields():
    cfg = load_config(_config("mbpo"), None, ["total_steps=1e4", "branch.rollout_batch_size=2e3"])
    assert cfg.total_steps == 10_000 and cfg.branch.rollout_batch_size == 2_000


# ----------------------------------------------------------------------------- YAML files


@pytest.mark.parametrize(
    "content, message",
    [
        (b"trials: 3\nhorizon: [1, 2\n", r"c.yaml:3:1: malformed YAML: .*; fix the syntax there"),
        (b"trials: 3\n  horizon: 4\n", r"c.yaml:2:10: malformed YAML"),
        (b"env: pendulum\xff\n", r"c.yaml: not UTF-8 text \(byte 0xff at offset 13\); save"),
        (
            b"trials: !!python/object/apply:os.system ['true']\n",
            r"c.yaml:1:9: the YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is "
            r"not allowed .*; remove the tag",
        ),
        (b"- trials\n- 3\n", r"c.yaml: the top level must be a mapping .* got a list"),
        (b"3\n", r"c.yaml: the top level must be a mapping .* got the value 3$"),
        (b"trials: 3\ntrials: 4\n", r"c.yaml:2:1: key 'trials' is given twice; keep one"),
        (b"model: 3\n", r"model: expected a mapping of EnsembleConfig fields, got 3"),
        (b"1: 2\n", r"unknown config key\(s\) 1; valid keys: env, "),
    ],
)
def test_bad_yaml_files_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(_config("pets"), path)
    assert "\n" not in str(e.value)


def test_empty_yaml_file_sets_nothing(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_config(_config("pets"), tmp_path / "empty.yaml") == _config("pets")()


def test_config_path_must_be_a_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass a YAML file"):
        load_config(_config("pets"), tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_config("pets"), tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lr=[1,", r"override 'model.lr=\[1,': the value is malformed YAML: .*; fix it"),
        ("trials={a: 1", r"override 'trials=\{a: 1': the value is malformed YAML"),
        ("trials=!!python/object/apply:os.system ['true']", r"YAML tag .* is not allowed"),
        ("trials", r"override 'trials' is not of the form key=value"),
        ("model.lr=1e-3x", r"model.lr: expected a number, got '1e-3x'"),
    ],
)
def test_malformed_overrides_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config("pets"), None, [override])


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "pets", "--env", "cartpole-balance", "model.lr=.inf"], "model.lr must be > 0"),
        (["run", "sac", "--env", "pendulum", "eval_episodes=0"], "eval_episodes must be"),
        (["run", "mbpo", "--seed", "-1"], "seed must be an integer in [0, 4294967296), got -1"),
        (["run", "td3", "env=nope"], "unknown env 'nope'"),
        (["run", "pets", "--config", "."], "is a directory; pass a YAML file"),
    ],
)
def test_cli_refuses_bad_values_before_any_run_folder(tmp_path, capsys, argv, message):
    assert cli.main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- diverging fits


def test_config_fit_names_the_config_keys():
    @dataclass
    class Section:
        lr: float = 10.0
        weight_decay: float = 0.1

    @dataclass
    class Cfg:
        model: Section = dataclasses.field(default_factory=Section)

    with pytest.raises(FitError) as e, config_fit(Cfg(), "model"):
        raise FitError(
            "Model.fit: training loss nan at epoch 3 with lr=10, weight_decay=0.1,\n"
            "noise_floor=1e-4; lower lr (self.lr stays)"
        )
    assert str(e.value) == (
        "model fit diverged: Model.fit: training loss nan at epoch 3 with model.lr=10, "
        "model.weight_decay=0.1, noise_floor=1e-4; lower model.lr (self.lr stays)"
    )
    with pytest.raises(FitError, match=r"diverged: boom; the fit's settings are the model\.\*"):
        with config_fit(Cfg(), "model"):
            raise FitError("boom")
    with config_fit(Cfg(), "model"):  # other errors pass through unchanged
        pass
    with pytest.raises(ValueError, match="^lr$"), config_fit(Cfg(), "model"):
        raise ValueError("lr")


PETS_TINY = ["trials=1", "seed_steps=50", "planner.population=16", "planner.iterations=1"]
PETS_TINY += ["model.ensemble_size=2", "particles=2", "model.hidden_size=16", "horizon=5"]
DYNA_TINY = ["total_steps=200", "epoch_length=200", "start_steps=100", "eval_episodes=1"]
DYNA_TINY += ["learner.hidden_size=16", "learner.batch_size=32", "model.ensemble_size=2"]
DYNA_TINY += ["model.num_elites=2", "model.hidden_size=16", "model.num_layers=2"]
DYNA_TINY += ["model.batch_size=32", "model.train_every=100"]


@pytest.mark.parametrize(
    "algo, env, tiny",
    [
        ("pets", "cartpole-balance", PETS_TINY),
        ("mbpo", "pendulum", [*DYNA_TINY, "branch.rollout_batch_size=8"]),
        ("mve", "pendulum", [*DYNA_TINY, "mve.horizon=2"]),
    ],
)
def test_a_diverging_model_fit_stops_the_run_naming_model_lr(tmp_path, capsys, algo, env, tiny):
    argv = ["run", algo, "--env", env, *tiny, "model.lr=1e8", "--runs-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("mbrl: error: model fit diverged: "), err
    assert "model.lr=1e+08" in err and "lower model.lr" in err, err


def test_learner_divergence_names_the_learner_keys():
    learner = LearnerConfig(lr=3e-4, tau=0.005)
    with pytest.raises(DivergenceError) as e:
        check_learner_stats({"q_loss": 1.0, "q_abs_max": 1.0, "alpha": math.inf}, 1e6, learner)
    assert "alpha=inf" in str(e.value)
    assert "lower learner.lr (now 0.0003)" in str(e.value)
    assert "smaller learner.tau (now 0.005)" in str(e.value)
    with pytest.raises(DivergenceError, match=r"q_loss=inf.*\(q_limit=1e\+06\)"):
        check_learner_stats({"q_loss": math.inf, "q_abs_max": 1.0}, 1e6)
    check_learner_stats({"q_loss": 1.0, "q_abs_max": 1.0, "actor_loss": math.nan}, 1e6)
