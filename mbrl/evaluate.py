"""Evaluate a trained run: rebuild its agent from the run folder and play episodes with it.

``mbrl eval runs/<name> [--checkpoint latest|best|checkpoint-<n>.pt] [--episodes N] [--video
out.gif|out.mp4]`` reads the run's ``run.yaml`` (algorithm), ``config.yaml`` (the resolved
config) and a checkpoint (with ``weights_only=True``, its digests checked), and never writes
into the folder. The checkpoint is ``checkpoint.pt``, the latest, by default; ``best`` is
``checkpoint-best.pt``, kept by a run started with ``mbrl run --keep-best`` (the checkpoint
after the best return logged; ``best.yaml`` says which and its return); a name picks one of the
kept numbered checkpoints. The agent is

- MPC runs (PETS, GP-MPC): the fitted model of the checkpoint, planned on by the run's
  planner in one MPC controller, as in the run's trials;
- latent image model runs (PlaNet, latent MPC): the fitted latent model, filtering each frame
  and planned on in its latent space by the run's planner, without the exploration noise of
  the run's trials;
- MCTS-MPC runs: the run's planner on the env's known model (nothing was learned);
- Dyna and model-free runs (SAC, TD3, DDPG, NAF, MBPO, MVE, MBA): the learner's deterministic
  policy, as in the run's evaluations;
- GPS runs: the global policy alone (its mean action, no local controller), as in the run's
  ``return`` and ``held_out_return`` columns;
- LQR-FLM runs: the noise-free local controller of each start condition, as in the run's
  ``return`` column.

Start states (``starts``). ``"resets"``: episode ``i`` resets its env with seed ``seed + i``
(the default, and the only choice, of MPC, Dyna and model-free runs). GPS and LQR-FLM runs
learn from ``M`` start conditions, the env reset with seed ``seed * 100003 + m`` of the run's
``seed`` (:func:`~mbrl.algorithms.lqr_flm.condition_seed`), and play ``T`` steps (the run's
``horizon``): ``"conditions"`` plays condition ``i mod M`` in episode ``i`` (the default of
LQR-FLM runs, whose time-varying controllers belong to their condition and play only there;
the episodes default to ``M``); ``"held-out"`` plays the conditions after the training ones,
``M + i`` (the default of GPS runs: the first ``held_out`` of them are those of the run's
``held_out_return``). The planner's generator is seeded with ``seed``.

The video records the first episode from the env's ``rgb_array`` rendering (MuJoCo envs need
``MUJOCO_GL=egl`` or ``osmesa`` without a display), written with imageio (the ``video``
extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml

from mbrl import algorithms, envs
from mbrl.algorithms.common import resolve_device
from mbrl.algorithms.dyna import DynaConfig, LearnerPolicy
from mbrl.algorithms.factory import make_ensemble, make_learner, make_planner
from mbrl.algorithms.gps import make_policy, policy_actions
from mbrl.algorithms.lqr_flm import (
    ActFn,
    LocalConfig,
    act_checked,
    condition_seed,
    initial_controllers,
)
from mbrl.algorithms.mpc_loop import MPCRunConfig, planning_problem
from mbrl.algorithms.planet import LatentRunConfig, latent_problem
from mbrl.config import from_dict
from mbrl.control import MPCController, Policy, run_episode
from mbrl.dynamics.base import DynamicsModel
from mbrl.extras import missing, require
from mbrl.planners import PlanningProblem
from mbrl.runs import BEST, LATEST, CheckpointError, load_checkpoint_file, numbered_checkpoints

VIDEO_SUFFIXES = (".gif", ".mp4")
STARTS = ("resets", "conditions", "held-out")
LOCAL_ALGOS = ("gps", "lqr-flm")  # runs that learn from start conditions


@dataclass(frozen=True)
class EvalResult:
    """Returns of the evaluation episodes of one run."""

    run: Path
    algo: str
    env: str
    returns: tuple[float, ...]  # [episodes]
    lengths: tuple[int, ...]  # [episodes] steps of each episode
    video: Path | None = None
    checkpoint: str = LATEST  # the file name of the checkpoint played
    starts: str = "resets"  # resets, conditions or held-out (see the module docstring)
    reset_seeds: tuple[int, ...] = ()  # [episodes] the env reset seed of each episode

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))

    def text(self) -> str:
        rets = ", ".join(f"{r:.1f}" for r in self.returns)
        where = {"conditions": " from the training conditions", "held-out": " from held-out starts"}
        lines = [
            f"{self.algo} on {self.env} ({self.run / self.checkpoint}): return {self.mean:.1f} "
            f"+- {self.std:.1f} over {len(self.returns)} episodes{where.get(self.starts, '')} "
            f"[{rets}]"
        ]
        if self.video is not None:
            lines.append(f"video: {self.video}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LoadedRun:
    """What a run folder says about its run, read without writing to it."""

    path: Path
    algo: str
    cfg: Any  # the algorithm's Config dataclass
    parts: dict[str, dict]  # state dict of each part of the checkpoint read
    checkpoint: Path  # the checkpoint read


def load_run(path: str | Path, checkpoint: str = "latest") -> LoadedRun:
    """Read ``run.yaml``, ``config.yaml`` and a checkpoint of the run folder ``path``.

    Args:
        checkpoint: ``"latest"`` (``checkpoint.pt``, else the newest ``checkpoint-<n>.pt``),
            ``"best"`` (``checkpoint-best.pt``) or the file name of a kept
            ``checkpoint-<n>.pt``.

    Raises:
        ValueError: not a run folder, or a ``checkpoint`` that is none of the above.
        CheckpointError: no such checkpoint (yet), or a corrupt one.
    """
    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / "run.yaml").is_file():
        raise ValueError(f"{path} is not a run folder (no config.yaml / run.yaml in it)")
    meta = yaml.safe_load((path / "run.yaml").read_text()) or {}
    algo = meta.get("algo")
    try:
        module = algorithms.get(str(algo))
    except ModuleNotFoundError as e:
        raise missing(e, f"evaluating a {algo} run") from None
    cfg = from_dict(module.Config, yaml.safe_load((path / "config.yaml").read_text()) or {})
    ckpt = _checkpoint_file(path, checkpoint)
    state = load_checkpoint_file(ckpt)["state"]
    parts = state.get("parts") if isinstance(state, dict) else None
    if not isinstance(parts, dict):
        raise CheckpointError(f"{ckpt} holds no parts (buffer, model, learner) to evaluate")
    return LoadedRun(path, str(algo), cfg, parts, ckpt)


def _checkpoint_file(path: Path, checkpoint: str) -> Path:
    """The file of ``--checkpoint`` ``checkpoint`` in the run folder ``path``."""
    numbered = numbered_checkpoints(path)  # newest first
    kept = ", ".join(p.name for _, p in numbered) or "none"
    if checkpoint == "latest":
        if (path / LATEST).is_file():
            return path / LATEST
        if numbered:
            return numbered[0][1]
        raise CheckpointError(f"{path} has no checkpoint yet: nothing trained to evaluate")
    if checkpoint == "best":
        if (path / BEST).is_file():
            return path / BEST
        raise CheckpointError(
            f"--checkpoint best: {path} has no {BEST} (the run was not started with "
            "`mbrl run --keep-best`, or wrote no checkpoint yet); use --checkpoint latest"
        )
    if any(p.name == checkpoint for _, p in numbered):
        return path / checkpoint
    raise ValueError(
        f"--checkpoint {checkpoint!r}: give latest, best or a kept checkpoint of {path} "
        f"(kept: {kept})"
    )


def build_policy(loaded: LoadedRun, spec: envs.EnvSpec, device: torch.device, seed: int) -> Policy:
    """The run's agent as an env policy: MPC over the loaded model (MPC runs) or the loaded
    learner's deterministic policy (Dyna and model-free runs).

    Raises:
        CheckpointError: the checkpoint lacks the fitted model or the learner.
        ValueError: an algorithm this module does not know how to rebuild.
    """
    cfg, parts = loaded.cfg, loaded.parts
    if loaded.algo == "mcts-mpc":
        from mbrl.algorithms.mcts_mpc import known_model

        model, value_fn = known_model(cfg.env)
        gen = torch.Generator(device=device).manual_seed(seed)
        problem = planning_problem(spec, model, cfg.horizon, cfg.particles, gen, device, value_fn)
        return MPCController(make_planner(cfg.planner), problem, cfg.replan_every, device)
    if isinstance(cfg, MPCRunConfig):
        if "model" not in parts:
            raise CheckpointError(
                f"{loaded.checkpoint} holds no fitted model (it was written before the first MPC "
                f"trial ended); continue the run with `mbrl resume {loaded.path}` first, or "
                "evaluate a later checkpoint"
            )
        gen = torch.Generator(device=device).manual_seed(seed)
        if isinstance(cfg, LatentRunConfig):
            latent = algorithms.get(loaded.algo).make_model(cfg, torch.device(device))[0]
            latent.load_state_dict(parts["model"])
            planner, problem = latent_problem(latent, spec, cfg, gen, torch.device(device))
            return MPCController(planner, problem, cfg.replan_every, device)
        model = _mpc_model(loaded.algo, cfg, spec, device)
        model.load_state_dict(parts["model"])
        low, high = spec.action_bounds(device)
        problem = PlanningProblem(
            model, spec.reward_fn, spec.termination_fn, cfg.horizon, low, high, cfg.particles, gen
        )
        return MPCController(make_planner(cfg.planner), problem, cfg.replan_every, device)
    if isinstance(cfg, DynaConfig):
        if "learner" not in parts:
            raise CheckpointError(f"{loaded.path}: the checkpoint holds no learner")
        hidden = spec.position_obs if cfg.ignore_positions else ()
        learner = make_learner(cfg.learner, spec, device, cfg.seed, hidden)
        learner.load_state_dict(parts["learner"])
        return LearnerPolicy(learner, deterministic=True)
    if loaded.algo == "gps":
        return condition_policies(loaded, spec, device)[0]
    if loaded.algo == "lqr-flm":
        raise ValueError(
            "an lqr-flm run's controllers are time-varying, one per start condition: take them "
            "with condition_policies()"
        )
    raise ValueError(f"mbrl eval does not know how to rebuild a {loaded.algo} run's agent")


class StepPolicy:
    """An env policy from a time-indexed action function ``act(x [1, X], t) -> u [1, U]`` (the
    controllers and the global policy of GPS and LQR-FLM runs), counting the steps from
    ``reset()`` and clipping the actions to the bounds as those runs' sampler does.

    Raises:
        ValueError: a step past ``horizon`` (the controller has no gains there), or a
            NaN/inf action (:func:`~mbrl.algorithms.lqr_flm.act_checked`).
    """

    def __init__(
        self, act: ActFn, spec: envs.EnvSpec, horizon: int, device: torch.device | str = "cpu"
    ) -> None:
        self._act, self.horizon = act, horizon
        self.dim, self.device = spec.act_dim, torch.device(device)
        self.low = torch.as_tensor(spec.action_low, dtype=torch.float32)  # [U]
        self.high = torch.as_tensor(spec.action_high, dtype=torch.float32)  # [U]
        self.t = 0

    def reset(self) -> None:
        self.t = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.t >= self.horizon:
            raise ValueError(
                f"step {self.t}: the controller has gains for {self.horizon} steps only; play "
                f"at most {self.horizon} steps"
            )
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)[None]
        u = act_checked(self._act, x, self.t, 1, self.dim)  # [1, U] float32 on the CPU
        self.t += 1
        return torch.minimum(torch.maximum(u[0], self.low), self.high).numpy()


def local_horizon(cfg: LocalConfig, spec: envs.EnvSpec) -> int:
    """``T``, the episode length of a GPS or LQR-FLM run."""
    return cfg.horizon or spec.max_episode_steps


def condition_policies(
    loaded: LoadedRun, spec: envs.EnvSpec, device: torch.device | str = "cpu"
) -> list[Policy]:
    """The agent of a GPS or LQR-FLM run for each of its ``M`` conditions: the global policy's
    mean (the same policy ``M`` times; it plays from any start) or the noise-free local
    controller of the condition.

    Raises:
        CheckpointError: the checkpoint lacks the policy or the controllers.
        ValueError: a run of another algorithm.
    """
    cfg, parts = loaded.cfg, loaded.parts
    if loaded.algo not in LOCAL_ALGOS:
        raise ValueError(f"{loaded.algo} runs have no start conditions")
    horizon = local_horizon(cfg, spec)
    need = "policy" if loaded.algo == "gps" else "local"
    if need not in parts:
        raise CheckpointError(f"{loaded.checkpoint} holds no {need} part to evaluate")
    if loaded.algo == "gps":
        dev = torch.device(device)
        policy = make_policy(cfg.policy, spec.obs_dim, spec.act_dim, cfg.init_variance, 0, dev)
        policy.load_state_dict(parts["policy"])
        act = policy_actions(policy, None, noise=False)
        return [StepPolicy(act, spec, horizon, dev)] * cfg.conditions
    local = initial_controllers(cfg, spec, horizon)
    local.load_state_dict(parts["local"])
    ones = [local.controller.condition(m) for m in range(cfg.conditions)]
    return [StepPolicy(one.mean_action, spec, horizon) for one in ones]


def _mpc_model(
    algo: str, cfg: MPCRunConfig, spec: envs.EnvSpec, device: torch.device
) -> DynamicsModel:
    """The (unfitted) model of an MPC run, built as its algorithm's ``train`` builds it."""
    if algo == "gp-mpc":
        from mbrl.algorithms.gp_mpc import build_model

        return build_model(cfg, spec, device)
    if algo == "pets":
        hidden = spec.position_obs if cfg.ignore_positions else ()
        return make_ensemble(cfg.model, spec, device, cfg.seed, hidden)
    raise ValueError(f"mbrl eval does not know the model of a {algo} run")


def evaluate_run(
    path: str | Path,
    episodes: int | None = None,
    seed: int = 0,
    video: str | Path | None = None,
    device: str = "cpu",
    checkpoint: str = "latest",
    starts: str | None = None,
) -> EvalResult:
    """Play ``episodes`` episodes of the run's agent from its ``checkpoint`` (``"latest"``,
    ``"best"`` or a kept ``checkpoint-<n>.pt``) from ``starts`` (``"resets"``,
    ``"conditions"`` or ``"held-out"``; ``None``: the algorithm's default). See the module
    docstring. ``episodes`` defaults to the run's ``M`` conditions with ``starts="conditions"``
    and to 5 otherwise.

    Raises:
        ValueError: ``episodes < 1``, a video file name that is not .gif or .mp4, or
            ``starts`` the run's agent cannot play from.
        MissingExtraError: a video without imageio (or imageio-ffmpeg for .mp4) installed.
    """
    if episodes is not None and episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if starts is not None and starts not in STARTS:
        raise ValueError(f"--starts {starts!r}: give one of {', '.join(STARTS)}")
    writer = _video_writer(Path(video)) if video is not None else None
    dev = resolve_device(device)
    loaded = load_run(path, checkpoint)
    spec = _played_spec(loaded)
    starts = _starts(loaded, starts)
    local = loaded.algo in LOCAL_ALGOS
    policies = (
        condition_policies(loaded, spec, dev) if local else [build_policy(loaded, spec, dev, seed)]
    )
    max_steps = local_horizon(loaded.cfg, spec) if local else None
    m = len(policies)
    if episodes is None:
        episodes = m if starts == "conditions" else 5
    if starts == "resets":
        plays = [(policies[0], seed + i) for i in range(episodes)]
    elif starts == "conditions":
        plays = [(policies[i % m], condition_seed(loaded.cfg.seed, i % m)) for i in range(episodes)]
    else:  # held-out: the conditions after the M training ones
        plays = [(policies[0], condition_seed(loaded.cfg.seed, m + i)) for i in range(episodes)]
    frames: list[np.ndarray] = []
    fps = 30
    env_action = spec.env_action if spec.discrete else None
    returns, lengths = [], []
    with torch.inference_mode():
        for i, (policy, reset_seed) in enumerate(plays):
            if writer is not None and i == 0:
                env: gym.Env = _Frames(spec.make(render_mode="rgb_array"), frames, spec.name)
                fps = int(env.metadata.get("render_fps") or fps)
            else:
                env = spec.make()
            try:
                ep = run_episode(
                    env, policy, seed=reset_seed, max_steps=max_steps, env_action=env_action
                )
            finally:
                env.close()
            returns.append(ep.ret)
            lengths.append(len(ep))
    out = writer(frames, fps) if writer is not None else None
    return EvalResult(
        Path(path),
        loaded.algo,
        spec.name,
        tuple(returns),
        tuple(lengths),
        out,
        loaded.checkpoint.name,
        starts,
        tuple(s for _, s in plays),
    )


def _played_spec(loaded: LoadedRun) -> envs.EnvSpec:
    """The env as the run played it (MCTS-MPC on a discretized box env plays the grid)."""
    if loaded.algo == "mcts-mpc":
        from mbrl.algorithms.mcts_mpc import planning_spec

        return planning_spec(loaded.cfg)
    return envs.make(loaded.cfg.env)


def _starts(loaded: LoadedRun, starts: str | None) -> str:
    """The start states of the evaluation: ``starts``, or the algorithm's default."""
    default = {"gps": "held-out", "lqr-flm": "conditions"}.get(loaded.algo, "resets")
    if starts is None or starts == default:
        return default
    if loaded.algo == "lqr-flm":
        raise ValueError(
            f"--starts {starts}: an lqr-flm run's controllers are time-varying, one per training "
            f"start condition ({loaded.cfg.conditions} here), and play only from those; use "
            "--starts conditions (the default)"
        )
    if loaded.algo not in LOCAL_ALGOS:
        raise ValueError(
            f"--starts {starts}: {loaded.algo} runs have no start conditions (only gps and "
            "lqr-flm runs do); leave --starts out and pick the resets with --seed"
        )
    return starts


class _Frames(gym.Wrapper):
    """Keeps ``env.render()`` after every reset and step."""

    def __init__(self, env: gym.Env, frames: list[np.ndarray], name: str) -> None:
        super().__init__(env)
        self._frames, self._name = frames, name

    def reset(self, **kwargs: Any) -> Any:
        out = self.env.reset(**kwargs)
        self._grab()
        return out

    def step(self, action: Any) -> Any:
        out = self.env.step(action)
        self._grab()
        return out

    def _grab(self) -> None:
        try:
            frame = self.env.render()
        except gym.error.DependencyNotInstalled as e:
            top = "pygame" if "pygame" in str(e) else None
            raise missing(ModuleNotFoundError(str(e), name=top), f"rendering {self._name}") from e
        self._frames.append(np.asarray(frame))


def _video_writer(path: Path) -> Callable[[list[np.ndarray], int], Path]:
    """A function writing frames to ``path``; the imports are checked now, before any episode."""
    if path.suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"--video {path}: the file must end in .gif or .mp4")
    imageio = require("imageio.v2", "writing a video")
    if path.suffix == ".mp4":
        require("imageio_ffmpeg", "writing an .mp4 video")

    def write(frames: list[np.ndarray], fps: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".gif":
            imageio.mimsave(path, frames, duration=1000.0 / fps, loop=0)
        else:
            imageio.mimsave(path, frames, fps=fps, macro_block_size=1)
        return path

    return write
