"""The ``mbrl`` command line.

```text
mbrl envs                                   list the env registry
mbrl presets                                list the preset configs
mbrl run ALGO --env NAME [key=value ...]    train, writing runs/<name>/ (runs/ALGO-ENV-seedN)
    --config FILE | --preset NAME           config values from a YAML file or a preset
    --seed N  --name NAME  --runs-dir DIR   the seed, the run folder's name and parent folder
    --device cpu|cuda                       where to train
    --show-config                           print the resolved config (YAML); nothing runs
    --overwrite                             replace the run folder if it exists
    --keep-checkpoints K  --keep-every N    keep the K newest checkpoints, and every N-th
    --keep-best                             also keep checkpoint-best.pt, of the best return
    --reward F  --termination F  --wrapper W    for --env gym:ID (any gymnasium env)
mbrl run ALGO --help                        every config key of ALGO, its default and meaning
mbrl run --continue runs/<name> trials=N    extend a finished run (trials, total_steps)
mbrl resume runs/<name> [--from checkpoint-<n>.pt]  continue a killed run from a checkpoint
mbrl eval runs/<name> [--checkpoint best] [--episodes N] [--starts S] [--video out.gif]
                                            play the trained agent, print its mean return
mbrl plot runs/<name> ... --out curves.png [--threshold R]
                                            learning curves: mean and band per algorithm
mbrl study control --system pendulum        LQR, iLQR, CEM, random shooting, NMPC compared
mbrl study gps --system point-mass-spread   LQR-FLM, GPS, iLQR and CEM on the same cost
mbrl sweep ALGO --env NAME --seeds 0-9 [key=a,b ...] [--backend local|ray]
                                            many seeds and settings, writing runs/sweep-<name>/
mbrl sweep --resume runs/sweep-<name>       continue its unfinished runs
mbrl sweep --report runs/sweep-<name>       its table, paired comparisons and plot
```
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from mbrl import __version__, algorithms, envs
from mbrl.algorithms.common import resolve_device
from mbrl.config import ConfigError, from_dict, load_config, to_dict
from mbrl.envs.gym_env import folder_name
from mbrl.runs import CheckpointError, Run, RunFolderError, never_started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mbrl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("envs", help="list the registered envs")
    sub.add_parser("presets", help="list the preset configs (mbrl run ALGO --preset NAME)")
    _add_eval_parser(sub)

    run_p = sub.add_parser("run", help="train an algorithm, writing runs/<name>/", add_help=False)
    run_p.add_argument(
        "algo", nargs="?", help=f"one of: {', '.join(sorted(algorithms.ALGORITHMS))}"
    )
    run_p.add_argument("--env", help="registry name (see `mbrl envs`), or gym:ID (any gymnasium)")
    run_p.add_argument("--config", help="YAML file of config values (see experiments/)")
    _add_run_options(run_p)
    run_p.add_argument("--seed", type=int, help="shorthand for seed=N")
    run_p.add_argument("--name", help="run folder name (default ALGO-ENV-seedN)")
    run_p.add_argument("--runs-dir", default="runs", help="parent folder of run folders")
    run_p.add_argument("--device", help="cpu (default) or cuda")
    run_p.add_argument(
        "--continue",
        dest="extend",
        metavar="runs/<name>",
        help="extend this finished run under its own config, from its last checkpoint: give "
        "only the larger budget (trials=N for pets and gp-mpc, total_steps=N for the others; "
        "stop_when_solved too, which a run that stopped when solved needs raised or 0); the old "
        "config is kept as config.<n>.yaml",
    )
    run_p.add_argument(
        "--keep-best",
        action="store_true",
        help="also keep checkpoint-best.pt: the checkpoint after the best return logged so far "
        "(mbrl eval --checkpoint best)",
    )
    run_p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run folder if it exists (refused while a process writes it)",
    )
    run_p.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        metavar="K",
        help="keep the K newest checkpoints (default 2), so a corrupt latest one is not the end",
    )
    run_p.add_argument(
        "--keep-every",
        type=int,
        default=0,
        metavar="N",
        help="also keep every N-th checkpoint, checkpoint-<multiple of N>.pt (default 0: none)",
    )
    run_p.add_argument("overrides", nargs="*", help="config overrides key=value")
    run_p.set_defaults(overrides=[])

    res_p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    res_p.add_argument("path", help="the run folder, runs/<name>")
    res_p.add_argument("--device", help="override the device the run was started with")
    res_p.add_argument(
        "--from",
        dest="resume_from",
        metavar="checkpoint-<n>.pt",
        help="continue from this kept checkpoint instead of the latest (a corrupt latest one)",
    )

    study_p = sub.add_parser("study", help="comparison studies")
    study_p.add_argument(
        "kind",
        choices=["control", "gps"],
        help="control: the control-theory study; gps: LQR-FLM and GPS against iLQR and CEM",
    )
    study_p.add_argument(
        "--system",
        required=True,
        help="control: linear, pendulum, cartpole, acrobot, or module:function returning an "
        "AnalyticSystem of one's own (e.g. my_pkg.systems:make_system); gps: an analytic env "
        "(point-mass, point-mass-spread, pendulum-swingup, ...)",
    )
    study_p.add_argument(
        "--initial-states", type=int, default=3, help="K initial states (gps: training starts M)"
    )
    study_p.add_argument("--held-out", type=int, default=4, help="gps: held-out start states")
    study_p.add_argument("--iterations", type=int, default=8, help="gps: LQR-FLM/GPS iterations")
    study_p.add_argument(
        "--samples", type=int, default=5, help="gps: episodes per start and iteration"
    )
    study_p.add_argument("--horizon", type=int, help="planning horizon (per-system default)")
    study_p.add_argument("--steps", type=int, help="episode length (per-system default)")
    study_p.add_argument("--seed", type=int, default=0)
    study_p.add_argument(
        "--methods",
        nargs="+",
        help="control: subset of lqr ilqr cem random_shooting nmpc mcts; gps: of lqr-flm gps "
        "ilqr cem",
    )
    study_p.add_argument(
        "--option",
        nargs="+",
        action="extend",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="planner constructor options, e.g. ilqr.max_iterations=20 cem.population=300",
    )
    study_p.add_argument("--name", help="run folder name (default study-KIND-SYSTEM)")
    study_p.add_argument("--runs-dir", default="runs")

    plot_p = sub.add_parser(
        "plot",
        help="learning curves of run folders on one axes: per algorithm, the mean over runs "
        "aligned on env steps with a bootstrap confidence band",
    )
    plot_p.add_argument("paths", nargs="+", help="run folders, runs/<name>")
    plot_p.add_argument(
        "--out", required=True, help="PNG file to write; the plotted numbers go to OUT.csv"
    )
    plot_p.add_argument("--y", default="return", help="metrics.csv column (default return)")
    plot_p.add_argument("--x", default="env_steps", help="metrics.csv column (default env_steps)")
    plot_p.add_argument("--title", default="")
    plot_p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="draw this y and report each run's first logged x at which its y reaches it",
    )
    plot_p.add_argument(
        "--per-run", action="store_true", help="one curve per run, not a mean per algorithm"
    )
    plot_p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="level of the bootstrap band of the mean over runs (default 0.95)",
    )
    plot_p.add_argument(
        "--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)"
    )

    _add_sweep_parser(sub)

    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after options
        takes = args.command in ("run", "sweep")
        if not takes or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "envs":
            return _envs()
        if args.command == "presets":
            return _presets()
        if args.command == "eval":
            return _eval(args)
        if args.command == "run":
            if args.extend is not None and not args.help:
                return _continue(args)
            if args.help or args.algo is None:
                return _run_help(args, run_p)
            _prepare_run(args)  # --preset, gym: env options
            return _run(args)
        if args.command == "resume":
            return _resume(args)
        if args.command == "study":
            return _study(args)
        if args.command == "plot":
            return _plot(args)
        if args.command == "sweep":
            return _sweep(args)
    except BrokenPipeError:  # `mbrl ... | head`: the reader left; stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (
        KeyError,
        ValueError,
        ConfigError,
        CheckpointError,
        RunFolderError,
        OSError,
        RuntimeError,
    ) as e:
        print(f"mbrl: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbrl: interrupted", file=sys.stderr)
        return 130
    return 0


def _message(e: BaseException) -> str:
    """An error's one-line message (a KeyError's own text, without the quotes)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


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
    if args.show_config:  # the resolved config only: nothing runs, no run folder
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    # everything is checked before the run folder exists: a refused value writes nothing
    if args.env is None:
        envs.make(cfg.env)  # the env of a --config file or the default
    device = args.device or "cpu"
    resolve_device(device)
    keep, every = _keep_options(args.keep_checkpoints, args.keep_every)
    best = "return" if args.keep_best else None
    name = args.name or f"{args.algo}-{folder_name(cfg.env)}-seed{cfg.seed}"
    path = _run_folder(args.runs_dir, name, given=args.name is not None)
    meta = {"algo": args.algo, "device": device, "keep_checkpoints": keep, "keep_every": every}
    meta["keep_best"] = best
    create = "overwrite" if args.overwrite else "new"  # "new" refuses a folder that exists
    run = Run(
        path, cfg, meta, keep_checkpoints=keep, keep_every=every, create=create, keep_best=best
    )
    return _train(module, cfg, run, device, args.algo, fresh=True)


def _run_folder(runs_dir: str, name: str, given: bool) -> Path:
    """``runs_dir/name``, refusing a name that is not one folder name inside ``runs_dir``."""
    seps = [s for s in ("/", "\\", os.sep, os.altsep) if s]
    if not name or name in (".", "..") or any(s in name for s in seps) or Path(name).is_absolute():
        what = f"--name {name!r}" if given else f"the run folder name {name!r}"
        raise ValueError(
            f"{what} must be one folder name inside --runs-dir (no '/', '\\', '..' or absolute "
            "path); give the parent folder with --runs-dir and the name alone with --name"
        )
    return Path(runs_dir) / name


def _keep_options(keep: int, every: int) -> tuple[int, int]:
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (keep, every))
    if not ints or keep < 1 or every < 0:
        raise ValueError(
            f"--keep-checkpoints {keep} --keep-every {every}: keep at least 1 checkpoint "
            "(--keep-checkpoints K >= 1) and every N-th with N >= 1 (0 keeps none extra)"
        )
    return keep, every


def _resume(args: argparse.Namespace) -> int:
    path = Path(args.path)
    meta, module, cfg = _read_run(path)
    run, device = _reopen(path, meta, cfg, args.device, resume_from=args.resume_from)
    return _train(module, cfg, run, device, meta["algo"])


def _reopen(
    path: Path, meta: dict, cfg: Any, device: str | None, **opening: Any
) -> tuple[Run, str]:
    """The run folder ``path`` opened again (resumed or continued) under the run settings its
    ``run.yaml`` stored (kept checkpoints, keep-best), and the device to train on: ``--device``
    if given, else the run's."""
    device = device or meta.get("device", "cpu")
    resolve_device(device)
    keep, every = _keep_options(meta.get("keep_checkpoints", 2), meta.get("keep_every", 0))
    run = Run(
        path,
        cfg,
        keep_checkpoints=keep,
        keep_every=every,
        keep_best=meta.get("keep_best"),
        **opening,
    )
    return run, device


def _continue(args: argparse.Namespace) -> int:
    """``mbrl run [ALGO] --continue runs/<name> key=value ...``: a finished run goes on under
    its own config with a larger budget (:func:`_budget_keys`), from its last checkpoint; the
    run folder records the new config (:class:`Run`'s ``extend_budget``)."""
    path = Path(args.extend)
    if args.algo is not None and "=" in args.algo:  # `mbrl run --continue runs/x trials=2`
        args.algo, args.overrides = None, [args.algo, *args.overrides]
    given = {
        "--env": args.env,
        "--config": args.config,
        "--preset": args.preset,
        "--seed": args.seed,
        "--name": args.name,
        "--overwrite": args.overwrite or None,
        "--keep-best": args.keep_best or None,
        "--reward": args.reward,
        "--termination": args.termination,
        "--wrapper": args.wrapper or None,
    }
    clash = [k for k, v in given.items() if v is not None]
    if clash:
        raise ValueError(
            f"--continue {path} goes on under the run's own config and run settings: drop "
            f"{', '.join(clash)} (only the budget, e.g. trials=N, --device and --show-config "
            "go with it)"
        )
    meta, module, stored = _read_run(path)
    algo = meta["algo"]
    if args.algo is not None and args.algo != algo:
        raise ValueError(f"{path} is a {algo} run, not {args.algo}: `mbrl run {algo} --continue`")
    budget = _budget_keys(stored)
    if not budget:
        raise ValueError(f"{algo} runs have no budget to extend; start a new run instead")
    keys = [item.partition("=")[0].strip() for item in args.overrides]
    if not keys:
        raise ValueError(
            f"--continue {path} needs the larger budget: {' or '.join(budget)}, e.g. "
            f"`mbrl run --continue {path} {budget[0]}={getattr(stored, budget[0]) + 1}`"
        )
    refused = [k for k in keys if k not in budget]
    if refused:
        raise ConfigError(
            f"--continue changes only the run's budget ({', '.join(budget)}), not {refused[0]}: "
            "the run's checkpoints hold a run of its own values; start a new run for it "
            f"(`mbrl run {algo} --config {path / 'config.yaml'} {refused[0]}=... --name NEW`)"
        )
    cfg = load_config(module.Config, path / "config.yaml", args.overrides)
    for key in ("trials", "total_steps", "iterations"):
        old, new = getattr(stored, key, None), getattr(cfg, key, None)
        if old is not None and new < old:
            raise ConfigError(
                f"{key}={new} is below the run's {key}={old}: --continue extends a run; give "
                f"{key} >= {old}"
            )
    if args.show_config:  # the continued config only: nothing runs, the folder is untouched
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    run, device = _reopen(path, meta, cfg, args.device, extend_budget=budget)
    return _train(module, cfg, run, device, algo)


def _budget_keys(cfg: Any) -> tuple[str, ...]:
    """The config keys ``--continue`` may change: when the run stops, never what it does
    before (the MPC loop reads ``trials`` and ``stop_when_solved`` only in its stopping rule,
    the Dyna loops ``total_steps`` in theirs and for the last, partial epoch)."""
    from mbrl.algorithms.dyna import DynaConfig
    from mbrl.algorithms.lqr_flm import LocalConfig
    from mbrl.algorithms.mpc_loop import MPCRunConfig

    if isinstance(cfg, MPCRunConfig):
        return ("trials", "stop_when_solved")
    if isinstance(cfg, DynaConfig):
        return ("total_steps",)
    if isinstance(cfg, LocalConfig):  # LQR-FLM and GPS read iterations in their stopping rule
        return ("iterations",)
    return ()


def _read_run(path: Path) -> tuple[dict, ModuleType, Any]:
    """The ``run.yaml`` mapping, the algorithm's module and the config of the run folder
    ``path``; a missing optional dependency of the algorithm names its extra."""
    config, run_yaml = path / "config.yaml", path / "run.yaml"
    if not config.exists() and not run_yaml.exists():
        raise RunFolderError(
            f"{path} is not a run folder (no config.yaml / run.yaml in it); pass the folder "
            "`mbrl run` wrote, runs/<name>"
        )
    if not run_yaml.exists() and never_started(path):
        raise RunFolderError(
            f"{path} was never started (it was stopped while being made, before run.yaml was "
            "written): run its `mbrl run` command again, which takes the folder over"
        )
    meta = _read_mapping(run_yaml, "the run's algorithm and device")
    if not isinstance(meta.get("algo"), str):
        raise RunFolderError(
            f"{run_yaml} names no algorithm (an `algo: NAME` line); put it back, e.g. `algo: pets`"
        )
    module = _algorithm(meta["algo"])
    try:
        cfg = from_dict(module.Config, _read_mapping(config, "the run's resolved config"))
    except ConfigError as e:
        raise ConfigError(f"{config}: {e}") from None
    return meta, module, cfg


def _read_mapping(path: Path, holds: str) -> dict:
    """The YAML mapping in a run folder's ``path`` (which holds ``holds``)."""
    fix = "put it back (a copy of it), or start the run over with its `mbrl run` command and "
    fix += "--overwrite"
    if not path.exists():
        raise RunFolderError(f"{path} is missing; resuming needs it ({holds}): {fix}")
    try:
        value = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise RunFolderError(f"{path} is not valid YAML ({first}): {fix}") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} does not hold a mapping of keys ({holds}): {fix}")
    return value


def _plot(args: argparse.Namespace) -> int:
    from mbrl.plots import grouped_curves, run_algo, summary_table

    groups: dict[str, list[Path]] = {}
    for p in map(Path, args.paths):
        if not (p / "metrics.csv").exists():
            raise ValueError(f"{p} has no metrics.csv; pass run folders (runs/<name>)")
        label = p.name if args.per_run else (run_algo(p) or p.name).upper()
        groups.setdefault(label, []).append(p / "metrics.csv")
    if not 0.0 < args.confidence < 1.0:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}; e.g. 0.95")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist; create it first")
    table = summary_table(groups, x=args.x, y=args.y, threshold=args.threshold)
    grouped_curves(
        groups,
        out,
        x=args.x,
        y=args.y,
        title=args.title,
        target=args.threshold,
        confidence=args.confidence,
        seed=args.bootstrap_seed,
    )
    print(table)
    print(f"plot: {out}\nplotted numbers: {out.with_suffix('.csv')}")
    return 0


def _study(args: argparse.Namespace) -> int:
    import torch

    if args.kind == "gps":
        return _study_gps(args)
    from mbrl.control.study import METHODS, load_system, parse_planner_options, run_study

    system = load_system(args.system)  # a built-in name, or the AnalyticSystem of module:function
    methods = tuple(args.methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise KeyError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    options = parse_planner_options(args.option)
    torch.set_num_threads(1)  # many tiny solves: threads only add synchronisation
    label = system if isinstance(system, str) else system.name
    out = Path(args.runs_dir) / (args.name or f"study-control-{label}")
    result = run_study(
        system,
        out,
        num_initial_states=args.initial_states,
        horizon=args.horizon,
        episode_steps=args.steps,
        seed=args.seed,
        methods=methods,
        planner_options=options,
    )
    print((out / "results.md").read_text())
    print(f"table: {out / 'results.csv'}\nplots: {out}/*.png")
    del result
    return 0


def _study_gps(args: argparse.Namespace) -> int:
    import torch

    from mbrl.control.study import GPS_METHODS, parse_planner_options, run_gps_study

    methods = tuple(args.methods or GPS_METHODS)
    unknown = sorted(set(methods) - set(GPS_METHODS))
    if unknown:
        raise KeyError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(GPS_METHODS)}")
    torch.set_num_threads(1)
    out = Path(args.runs_dir) / (args.name or f"study-gps-{args.system}")
    run_gps_study(
        args.system,
        out,
        conditions=args.initial_states,
        held_out=args.held_out,
        iterations=args.iterations,
        samples=args.samples,
        horizon=args.horizon or 40,
        episode_steps=args.steps,
        seed=args.seed,
        methods=methods,
        planner_options=parse_planner_options(args.option),
    )
    print((out / "results.md").read_text())
    print(f"table: {out / 'results.csv'}\nplot: {out / 'gps_study.png'}")
    return 0


def _train(module, cfg, run: Run, device: str, algo: str, fresh: bool = False) -> int:
    """Train (or resume) ``run``; 130 after a Ctrl-C, saying where a resume continues.

    A refusal before anything was written removes the folder when this command made it
    (``fresh``), so the corrected command can run under the same name; on a folder that holds
    no checkpoint yet the message says how to start over."""
    from mbrl.algorithms.loop import Stopped

    print(f"{algo} on {cfg.env}, seed {cfg.seed}: writing {run.path}", flush=True)
    try:
        with _ctrl_c_stops_at_checkpoint(run):
            summary = module.train(cfg, run, device=device)
    except KeyboardInterrupt as e:
        how = "stopped" if isinstance(e, Stopped) else "interrupted"
        lost = "" if isinstance(e, Stopped) else " (the work since it is lost)"
        print(
            f"mbrl: {how}; {run.latest_checkpoint_text()}{lost}; continue with "
            f"`mbrl resume {run.path}`",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except (KeyError, ValueError, RuntimeError) as e:
        if run.has_checkpoint or isinstance(e, RunFolderError | CheckpointError):
            raise
        if fresh and not run.metrics():
            shutil.rmtree(run.path, ignore_errors=True)  # nothing in it to keep
            raise
        raise RunFolderError(
            f"{_message(e)}; {run.path} holds no checkpoint yet, so nothing is lost by "
            "starting over: fix the value and rerun its `mbrl run` command with --overwrite"
        ) from e
    finally:
        run.close()
    print(summary.text(f"{algo} on {cfg.env}"))
    print(f"metrics: {run.metrics_path}\nplot: {run.path / 'learning_curve.png'}")
    return 0


@contextmanager
def _ctrl_c_stops_at_checkpoint(run: Run) -> Iterator[None]:
    """While training: the first Ctrl-C (SIGINT) asks ``run`` to stop at its next checkpoint
    (:func:`mbrl.algorithms.loop.stop_if_requested`); a second one interrupts at once."""
    if (
        threading.current_thread() is not threading.main_thread()  # handlers: main thread only
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # started ignoring it (nohup, &)
    ):
        yield
        return

    def first(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run.request_stop()
        print(
            "\nmbrl: Ctrl-C: the run stops at its next checkpoint (the end of this trial or "
            "epoch); press Ctrl-C again to stop now, losing the work since the latest checkpoint",
            file=sys.stderr,
            flush=True,
        )

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


# -- run options, presets, eval ---------------------------------------------------------------


def _add_run_options(run_p: argparse.ArgumentParser) -> None:
    """The options of ``mbrl run`` besides the run's own (help, presets, gym: envs)."""
    run_p.add_argument(
        "-h", "--help", action="store_true", help="this help and every config key of ALGO"
    )
    run_p.add_argument("--preset", help="a preset config by name (see `mbrl presets`)")
    run_p.add_argument(
        "--show-config",
        action="store_true",
        help="print the resolved config (YAML) and stop: nothing runs, no run folder",
    )
    gym_opts = run_p.add_argument_group("gym:ID envs (any gymnasium env)")
    gym_opts.add_argument(
        "--reward", help="module:function, the batched torch reward(obs, act, next_obs) -> [B]"
    )
    gym_opts.add_argument(
        "--termination", help="module:function, termination(next_obs) -> bool [B]"
    )
    gym_opts.add_argument(
        "--wrapper",
        action="append",
        default=[],
        help="a gymnasium.wrappers class taking only the env (ClipAction ...); repeatable",
    )


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    eval_p = sub.add_parser("eval", help="play a trained run's agent, print its mean return")
    eval_p.add_argument("path", help="the run folder, runs/<name>")
    eval_p.add_argument(
        "--episodes",
        type=int,
        help="episodes to play (default 5; the run's conditions with --starts conditions)",
    )
    eval_p.add_argument(
        "--seed", type=int, default=0, help="episode i resets with seed + i (--starts resets)"
    )
    eval_p.add_argument(
        "--starts",
        choices=("resets", "conditions", "held-out"),
        help="start states: env resets with seed + i (the default, and the only choice, but "
        "for gps and lqr-flm runs), the run's training conditions (the default of lqr-flm "
        "runs), or the conditions after them (the default of gps runs)",
    )
    eval_p.add_argument("--video", help="write the first episode to this .gif or .mp4 file")
    eval_p.add_argument(
        "--checkpoint",
        default="latest",
        metavar="latest|best|checkpoint-<n>.pt",
        help="the checkpoint to play: the latest (default), the best (a run started with "
        "--keep-best), or a kept numbered one",
    )
    eval_p.add_argument("--device", default="cpu", help="cpu or cuda")


def _run_help(args: argparse.Namespace, run_p: argparse.ArgumentParser) -> int:
    """``mbrl run [ALGO] --help``: the options, then ALGO's config keys."""
    if args.algo is None and not args.help:
        run_p.error("the following arguments are required: algo")
    print(run_p.format_help())
    if args.algo is None:
        print("`mbrl run ALGO --help` also lists every config key of ALGO.")
        return 0
    from mbrl.config_help import help_text

    module = _algorithm(args.algo)
    print(
        f"config keys of {args.algo} (key=value after the options, or in a --config or "
        f"--preset YAML file; nested keys are dotted):\n"
    )
    print(help_text(module.Config))
    return 0


def _algorithm(name: str):
    """The algorithm's module; a missing optional dependency names its extra."""
    from mbrl.extras import missing

    try:
        return algorithms.get(name)
    except ModuleNotFoundError as e:
        raise missing(e, name) from None


def _prepare_run(args: argparse.Namespace) -> None:
    """Turn ``--preset`` into ``--config`` and the gym: options into the env name."""
    from mbrl import presets
    from mbrl.algorithms.mpc_loop import MPCRunConfig
    from mbrl.envs import gym_env

    module = _algorithm(args.algo)
    if args.preset is not None:
        if args.config is not None:
            raise ValueError("give --preset or --config, not both")
        preset = presets.get(args.preset)
        if preset.algorithm != args.algo:
            raise ValueError(
                f"preset {preset.name} is for {preset.algorithm}, not {args.algo}: "
                f"`mbrl run {preset.algorithm} --preset {preset.name}`"
            )
        args.config = str(preset.path)
    given = {"--reward": args.reward, "--termination": args.termination}
    given["--wrapper"] = args.wrapper or None
    if any(v is not None for v in given.values()):
        if args.env is None or not gym_env.is_gym_name(args.env):
            used = ", ".join(k for k, v in given.items() if v is not None)
            raise ValueError(f"{used} go with --env gym:ID (a gymnasium env); got --env {args.env}")
        parts = gym_env.GymEnvName.parse(args.env)
        args.env = gym_env.gym_name(
            parts.env_id,
            reward=args.reward or parts.reward,
            termination=args.termination or parts.termination,
            wrappers=(*parts.wrappers, *args.wrapper),
            max_episode_steps=parts.max_episode_steps,
        )
    if args.env is not None and gym_env.is_gym_name(args.env):
        no_reward = gym_env.GymEnvName.parse(args.env).reward is None
        if no_reward and issubclass(module.Config, MPCRunConfig):
            raise ValueError(
                f"{args.algo} plans with the env's reward function, and --env {args.env} has "
                "none: pass --reward module:function (a batched torch reward(obs, act, "
                "next_obs) -> [B])"
            )


def _presets() -> int:
    from mbrl import presets

    found = presets.presets()
    width = max((len(p.name) for p in found), default=0)
    for p in found:
        print(f"{p.name:<{width}}  {p.algorithm:<7} {p.summary}")
    print(f"\nrun one with `mbrl run ALGO --preset NAME`; the files are in {presets.folder()}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mbrl.evaluate import evaluate_run

    result = evaluate_run(
        args.path,
        episodes=args.episodes,
        seed=args.seed,
        video=args.video,
        device=args.device,
        checkpoint=args.checkpoint,
        starts=args.starts,
    )
    print(result.text())
    return 0


# -- sweeps -----------------------------------------------------------------------------------


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    sweep_p = sub.add_parser(
        "sweep",
        help="many seeds and settings as ordinary runs in runs/sweep-<name>/, on a local pool "
        "or a Ray cluster, with one report (table, paired comparisons, plot)",
    )
    sweep_p.add_argument(
        "algo", nargs="?", help="an algorithm, or several comma separated (mba,naf)"
    )
    sweep_p.add_argument("--env", help="registry name or gym:ID (or env=a,b among the values)")
    sweep_p.add_argument("--seeds", help="the seeds: 0-9, 0,2,5 or mixed (0-3,7)")
    sweep_p.add_argument("--config", help="YAML file of config values; {algo} is each algorithm")
    sweep_p.add_argument(
        "--preset", help="a preset by name; {algo} is each algorithm ('{algo}_pendulum')"
    )
    sweep_p.add_argument(
        "--backend", choices=["local", "ray"], help="local (default): a pool of processes here"
    )
    sweep_p.add_argument(
        "--cpus-per-run", type=int, metavar="N", help="CPUs and torch threads per run (default 1)"
    )
    sweep_p.add_argument("--address", help="the Ray cluster's address (default: start one here)")
    sweep_p.add_argument("--name", help="the sweep's name: runs/sweep-NAME (default ALGO-ENV)")
    sweep_p.add_argument("--runs-dir", default="runs", help="parent folder of the sweep folder")
    sweep_p.add_argument(
        "--retries",
        type=int,
        metavar="R",
        help="attempts a crashed run gets after its first (default 2), each resuming from its "
        "last checkpoint",
    )
    sweep_p.add_argument(
        "--threshold", type=float, help="the report gives the first env step reaching this return"
    )
    sweep_p.add_argument(
        "--resume", metavar="runs/sweep-<name>", help="continue the sweep's unfinished runs"
    )
    sweep_p.add_argument(
        "--report", metavar="runs/sweep-<name>", help="write the sweep's report.md and report.png"
    )
    sweep_p.add_argument("overrides", nargs="*", help="config values key=value or key=a,b,...")
    sweep_p.set_defaults(overrides=[])


def _sweep(args: argparse.Namespace) -> int:
    """``mbrl sweep``: make, continue or report a sweep (see :mod:`mbrl.sweep`)."""
    import dataclasses

    from mbrl import sweep

    made = {"ALGO": args.algo, "--seeds": args.seeds, "--env": args.env, "--name": args.name}
    made |= {"--config": args.config, "--preset": args.preset}
    made["key=value"] = args.overrides or None
    given = [k for k, v in made.items() if v is not None]
    if args.report is not None or args.resume is not None:
        flag = "--report" if args.report is not None else "--resume"
        if given or (args.report is not None and args.resume is not None):
            both = ["--resume"] if args.report is not None and args.resume is not None else []
            raise ValueError(
                f"{flag} takes the sweep as it was made; drop {', '.join(both + given)} (start "
                "a new sweep under another --name to change them)"
            )
    if args.report is not None:
        report = sweep.sweep_report(Path(args.report), threshold=args.threshold)
        print(report.text, end="")
        print(f"report: {report.markdown}" + (f"\nplot: {report.plot}" if report.plot else ""))
        return 0
    limits = (("--cpus-per-run", args.cpus_per_run, 1), ("--retries", args.retries, 0))
    for flag, value, least in limits:
        if value is not None and value < least:
            raise ValueError(f"{flag} must be an integer >= {least}, got {value}")
    if args.resume is not None:
        folder = Path(args.resume)
        manifest = sweep.Manifest.load(folder)
        chosen = {
            "backend": args.backend,
            "cpus_per_run": args.cpus_per_run,
            "retries": args.retries,
            "address": args.address,
            "threshold": args.threshold,
        }
        manifest = dataclasses.replace(
            manifest, **{k: v for k, v in chosen.items() if v is not None}
        )
    else:
        if args.algo is None or args.seeds is None:
            raise ValueError(
                "mbrl sweep needs ALGO and --seeds (mbrl sweep pets --env cartpole-balance "
                "--seeds 0-3), or --resume / --report runs/sweep-<name>"
            )
        algos = [a.strip() for a in args.algo.split(",") if a.strip()]
        for algo in algos:
            _algorithm(algo)  # an unknown name lists the valid ones
        runs = sweep.expand(
            algos,
            sweep.parse_seeds(args.seeds),
            args.overrides,
            env=args.env,
            config=args.config,
            preset=args.preset,
        )
        name = args.name or sweep.plan.default_name(runs)
        folder = _run_folder(args.runs_dir, f"sweep-{name}", given=args.name is not None)
        if folder.exists():
            raise RunFolderError(
                f"sweep folder {folder} exists; continue it with `mbrl sweep --resume {folder}`, "
                "or pick another --name"
            )
        command = [args.algo, *(["--env", args.env] if args.env else []), "--seeds", args.seeds]
        command += ["--config", args.config] if args.config else []
        command += ["--preset", args.preset] if args.preset else []
        options = {"--backend": args.backend, "--cpus-per-run": args.cpus_per_run}
        options |= {"--address": args.address, "--retries": args.retries}
        options["--threshold"] = args.threshold
        command += [str(x) for k, v in options.items() if v is not None for x in (k, v)]
        command += ["--name", name, *args.overrides]
        manifest = sweep.Manifest(
            name=name,
            command=tuple(command),
            backend=args.backend or "local",
            cpus_per_run=args.cpus_per_run or 1,
            retries=2 if args.retries is None else args.retries,
            address=args.address,
            threshold=args.threshold,
            runs=tuple(sweep.RunRecord(spec) for spec in runs),
        )
    cpus = manifest.cpus_per_run
    if manifest.backend == "ray":
        pool = sweep.RayPool(cpus, manifest.address)  # without ray: how to install it
        where = manifest.address or "a Ray instance started here"
        print(f"ray: {where}, ready in {pool.startup_seconds:.1f} s", file=sys.stderr)
    else:
        pool = sweep.LocalPool(cpus)
    try:
        if args.resume is None:
            folder.mkdir(parents=True)
            manifest.save(folder)
        todo = sum(r.state != "done" for r in manifest.runs)
        print(
            f"sweep {manifest.name}: {todo} of {len(manifest.runs)} runs to go, {pool.slots} at "
            f"once ({manifest.backend}, {cpus} CPU each), writing {folder}",
            file=sys.stderr,
            flush=True,
        )
        result = sweep.run_sweep(folder, manifest, pool, view=sweep.LiveView())
    finally:
        pool.close()
    counts = result.manifest.counts()
    if result.stopped:
        print(
            f"mbrl sweep: stopped after {result.seconds:.0f} s with {counts['done']} of "
            f"{len(manifest.runs)} runs done, every run's checkpoint intact; continue with "
            f"`mbrl sweep --resume {folder}`",
            file=sys.stderr,
        )
        return 130
    report = sweep.sweep_report(folder)
    print(report.text, end="")
    print(f"report: {report.markdown}" + (f"\nplot: {report.plot}" if report.plot else ""))
    apart = f" (Ray start-up {pool.startup_seconds:.1f} s apart)"
    print(
        f"sweep {manifest.name}: {counts['done']} of {len(manifest.runs)} runs done in "
        f"{result.seconds:.1f} s{apart if manifest.backend == 'ray' else ''}",
        file=sys.stderr,
    )
    failed = [r for r in result.manifest.runs if r.state != "done"]
    if failed:
        print(
            f"mbrl sweep: {len(failed)} run(s) failed: "
            + "; ".join(f"{r.spec.name} ({r.error})" for r in failed)
            + f"; their output is in {folder / 'logs'}; retry them with "
            f"`mbrl sweep --resume {folder}`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
