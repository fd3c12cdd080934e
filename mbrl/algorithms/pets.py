"""PETS: probabilistic ensembles with trajectory sampling (Chua et al. 2018, Algorithm 1).

    collect random episodes until ``seed_steps`` transitions are stored
    for trial = 1 .. trials:
        fit the ensemble on every stored transition
        run one episode with MPC: CEM over the ensemble's particle rollouts (TS-inf)
        store the episode's transitions

The loop, its metrics and its checkpoints are :func:`mbrl.algorithms.mpc_loop.train_mpc`,
shared with GP-MPC; a killed run resumes from its last checkpoint (``mbrl resume runs/<name>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms.common import Summary, resolve_device
from mbrl.algorithms.factory import (
    EnsembleConfig,
    PlannerConfig,
    make_ensemble,
    make_planner,
    resolve_planning_dtype,
)
from mbrl.algorithms.mpc_loop import MPCRunConfig, train_mpc
from mbrl.config import ConfigError, Count, Natural
from mbrl.runs import Run


def pets_ensemble() -> EnsembleConfig:
    """PETS's ensemble (section 4.1): 5 members of 3 x 200 units, all used, TS-inf particles,
    the env's reward; planning in bfloat16 where the hardware runs it natively (``auto``)."""
    return EnsembleConfig(
        ensemble_size=5,
        num_elites=None,
        num_layers=3,
        weight_decay=5e-5,
        batch_size=32,
        val_fraction=0.1,
        learns_reward=False,
        propagation="ts_inf",
        planning_dtype="auto",
    )


@dataclass
class Config(MPCRunConfig):
    """PETS. The defaults are the quick demo: cartpole balance solved in a few minutes.

    Loop fields (env, seed, trials, seed_steps, horizon, particles, ...) are documented on
    :class:`~mbrl.algorithms.mpc_loop.MPCRunConfig`; particles must be a multiple of the
    elite count for TS-inf, and 1 for ``model.propagation=expectation``.
    """

    seed_steps: Natural = 200
    particles: Count = 10
    stop_when_solved: Natural = 1
    ignore_positions: bool = True
    """Leave the env's position features (``EnvSpec.position_obs``: HalfCheetah's and Hopper's
    x) out of the model inputs, as PETS's own HalfCheetah observation does; their change is
    still predicted, so the reward can score forward progress."""
    model: EnsembleConfig = field(default_factory=pets_ensemble)
    """The ensemble (``model.train_every`` is not read: PETS refits once per trial)."""
    planner: PlannerConfig = field(
        default_factory=lambda: PlannerConfig(population=200, iterations=3)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        m, p = self.model, self.particles
        m.check("model")
        if m.propagation == "ts_inf" and p % m.elites:
            raise ConfigError(
                f"particles={p} is not a multiple of the {m.elites} elites (model.num_elites, "
                "else model.ensemble_size) among which model.propagation=ts_inf shares the "
                f"particles; use particles={m.elites * max(1, round(p / m.elites))}, or "
                "model.propagation=ts1"
            )
        if m.propagation == "expectation" and p > 1:
            raise ConfigError(
                f"particles={p} with model.propagation=expectation rolls out {p} identical mean "
                "trajectories; set particles=1, or model.propagation=ts1 or ts_inf"
            )


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) PETS as configured, logging to ``run``; returns the summary."""
    dev = resolve_device(device)
    spec = envs.make(cfg.env)
    hidden = spec.position_obs if cfg.ignore_positions else ()
    model = make_ensemble(cfg.model, spec, dev, cfg.seed, hidden)
    tqdm.write(resolve_planning_dtype(cfg.model.planning_dtype, dev)[1])
    return train_mpc(run, cfg, model, make_planner(cfg.planner), label="PETS", device=dev)
