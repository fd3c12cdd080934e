"""The ``mbrl`` command line.

mbrl envs                                    list the env registry
mbrl run ALGO --env NAME [key=value ...]     train, writing runs/<name>/
mbrl resume runs/<name>                      continue a killed run from its checkpoint
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from mbrl import algorithms, envs
from mbrl.algorithms.common import resolve_device
from mbrl.config import ConfigError, from_dict, load_config
from mbrl.runs import CheckpointError, Run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mbrl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("envs", help="list the registered envs")

    run_p = sub.add_parser("run", help="train an algorithm, writing runs/<name>/")
    run_p.add_argument("algo", help=f"one of: {', '.join(sorted(algorithms.ALGORITHMS))}")
    run_p.add_argument("--env", help="registry name (see `mbrl envs`)")
    run_p.add_argument("--config", help="YAML file of config values (see experiments/)")
    run_p.add_argument("--seed", type=int, help="shorthand for seed=N")
    run_p.add_argument("--name", help="run folder name (default ALGO-ENV-seedN)")
    run_p.add_argument("--runs-dir", default="runs", help="parent folder of run folders")
    run_p.add_argument("--device", default="cpu", help="cpu or cuda")
    run_p.add_argument("overrides", nargs="*", help="config overrides key=value")
    run_p.set_defaults(overrides=[])

    res_p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    res_p.add_argument("path", help="the run folder, runs/<name>")
    res_p.add_argument("--device", help="override the device the run was started with")

    study_p = sub.add_parser("study", help="comparison studies")
    study_p.add_argument("kind", choices=["control"], help="control: the control-theory study")
    study_p.add_argument("--system", required=True, help="linear, pendulum, cartpole or acrobot")
    study_p.add_argument("--initial-states", type=int, default=3, help="K initial states")
    study_p.add_argument("--horizon", type=int, help="planning horizon (per-system default)")
    study_p.add_argument("--steps", type=int, help="episode length (per-system default)")
    study_p.add_argument("--seed", type=int, default=0)
    study_p.add_argument("--methods", nargs="+", help="subset of lqr ilqr cem random_shooting nmpc")
    study_p.add_argument("--name", help="run folder name (default study-control-SYSTEM)")
    study_p.add_argument("--runs-dir", default="runs")

    plot_p = sub.add_parser("plot", help="learning curves of run folders on one axes")
    plot_p.add_argument("paths", nargs="+", help="run folders, runs/<name>")
    plot_p.add_argument("--out", required=True, help="PNG file to write")
    plot_p.add_argument("--y", default="return", help="metrics.csv column (default return)")
    plot_p.add_argument("--x", default="env_steps", help="metrics.csv column (default env_steps)")
    plot_p.add_argument("--title", default="")
    plot_p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="also report the first x at which y reaches this value",
    )
    plot_p.add_argument(
        "--per-run", action="store_true", help="one curve per run, not a mean per algorithm"
    )

    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after options
        if args.command != "run" or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "envs":
            return _envs()
        if args.command == "run":
            return _run(args)
        if args.command == "resume":
            return _resume(args)
        if args.command == "study":
            return _study(args)
        if args.command == "plot":
            return _plot(args)
    except (
        KeyError,
        ValueError,
        ConfigError,
        CheckpointError,
        FileExistsError,
        RuntimeError,
    ) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mbrl: error: {message}", file=sys.stderr)
        return 2
    return 0


def _envs() -> int:
    width = max(len(n) for n in envs.names())
    for name in envs.names():
        spec = envs.make(name)
        actions = f"A={spec.num_actions}" if spec.discrete else "box"
        print(
            f"{name:<{width}}  X={spec.obs_dim:<3} U={spec.act_dim:<2} {actions:<5} "
            f"T={spec.max_episode_steps:<5} {spec.description}"
        )
    return 0


def _run(args: argparse.Namespace) -> int:
    module = algorithms.get(args.algo)
    overrides = list(args.overrides)
    if args.env is not None:
        envs.make(args.env)  # unknown names fail here, listing the valid ones
        overrides.append(f"env={args.env}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(module.Config, args.config, overrides)
    resolve_device(args.device)  # before the run folder exists: a bad device writes nothing
    name = args.name or f"{args.algo}-{cfg.env}-seed{cfg.seed}"
    path = Path(args.runs_dir) / name
    if (path / "checkpoint.pt").exists() or (path / "config.yaml").exists():
        raise FileExistsError(
            f"run folder {path} already exists; continue it with `mbrl resume {path}` "
            f"or pick another --name"
        )
    meta = {"algo": args.algo, "device": args.device}
    fresh = not path.exists()
    try:
        return _train(module, cfg, Run(path, cfg, meta), args.device, args.algo)
    except ConfigError:
        # refused before any training: a folder this command made holds nothing to keep, and
        # leaving it would block rerunning the fixed command under the same name
        if fresh and not (path / "checkpoint.pt").exists():
            shutil.rmtree(path, ignore_errors=True)
        raise


def _resume(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not (path / "config.yaml").exists() or not (path / "run.yaml").exists():
        raise FileExistsError(f"{path} is not a run folder (no config.yaml / run.yaml in it)")
    meta = yaml.safe_load((path / "run.yaml").read_text())
    module = algorithms.get(meta["algo"])
    cfg = from_dict(module.Config, yaml.safe_load((path / "config.yaml").read_text()) or {})
    device = args.device or meta.get("device", "cpu")
    resolve_device(device)
    return _train(module, cfg, Run(path, cfg), device, meta["algo"])


def _plot(args: argparse.Namespace) -> int:
    from mbrl.plots import grouped_curves, run_algo, summary_table

    groups: dict[str, list[Path]] = {}
    for p in map(Path, args.paths):
        if not (p / "metrics.csv").exists():
            raise ValueError(f"{p} has no metrics.csv; pass run folders (runs/<name>)")
        label = p.name if args.per_run else (run_algo(p) or p.name).upper()
        groups.setdefault(label, []).append(p / "metrics.csv")
    out = grouped_curves(groups, Path(args.out), x=args.x, y=args.y, title=args.title)
    print(summary_table(groups, x=args.x, y=args.y, threshold=args.threshold))
    print(f"plot: {out}")
    return 0


def _study(args: argparse.Namespace) -> int:
    import torch

    from mbrl.control.study import METHODS, run_study
    from mbrl.envs.systems import SYSTEMS

    if args.system not in SYSTEMS:
        raise KeyError(f"unknown system {args.system!r}; valid names: {', '.join(SYSTEMS)}")
    methods = tuple(args.methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise KeyError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    torch.set_num_threads(1)  # many tiny solves: threads only add synchronisation
    out = Path(args.runs_dir) / (args.name or f"study-control-{args.system}")
    result = run_study(
        args.system,
        out,
        num_initial_states=args.initial_states,
        horizon=args.horizon,
        episode_steps=args.steps,
        seed=args.seed,
        methods=methods,
    )
    print((out / "results.md").read_text())
    print(f"table: {out / 'results.csv'}\nplots: {out}/*.png")
    del result
    return 0


def _train(module, cfg, run: Run, device: str, algo: str) -> int:
    print(f"{algo} on {cfg.env}, seed {cfg.seed}: writing {run.path}", flush=True)
    try:
        summary = module.train(cfg, run, device=device)
    finally:
        run.close()
    print(summary.text(f"{algo} on {cfg.env}"))
    print(f"metrics: {run.metrics_path}\nplot: {run.path / 'learning_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
