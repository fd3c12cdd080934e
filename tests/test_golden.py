"""Golden numbers pin behaviour: planning returns and plans of every model, iLQR and LQR.

Every number below came from the pre-revision code (commit f795a6c, before the planning step,
``value_fn`` and ``WarmStart`` contracts) run with the same seeds, data and settings as the
tests here; the tests assert that the current code reproduces them. Float32 evaluations and
plans are compared at ``rtol = atol = 1e-6``, iLQR's float64 costs at ``1e-9`` relative.

Models: a small :class:`ProbabilisticEnsemble` fitted briefly on 200 transitions of
Pendulum-v1 under a seeded random policy (propagations ``ts_inf``, ``ts1``, ``expectation``), a
:class:`GaussianProcessModel` fitted on 120 of them, the MuJoCo ground truth of ``half-cheetah``
and the analytic pendulum swing-up (with its terminal cost as the value). Planners are called
without a warm start (``plan(problem, x0)``); the closed loop exercises the controller's own
warm start.

Three spellings differ between the revisions, handled by the helpers below: the terminal value
is ``value_fn(state)`` of a rollout state (before: ``terminal_reward_fn(obs)``), an initial
guess is handed to a planner as a ``WarmStart`` (before: the ``[H, U]`` tensor itself), and an
analytic system's model is ``mbrl.dynamics.systems.SystemModel(system)`` (before:
``system.model()``).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from mbrl.control import MPCController, RandomPolicy, run_episode
from mbrl.dynamics import GaussianProcessModel, ProbabilisticEnsemble, Transitions
from mbrl.dynamics.base import RolloutState
from mbrl.dynamics.mujoco_model import MujocoModel
from mbrl.envs import make
from mbrl.envs.spec import EnvSpec
from mbrl.envs.systems import SYSTEMS, AnalyticSystem
from mbrl.planners import CEM, MPPI, RandomShooting
from mbrl.planners.base import PlanningProblem
from mbrl.planners.ilqr import ILQR
from mbrl.planners.lqr import LQR

N, H = 16, 8  # candidates and horizon of the evaluate and sampling-planner cases
F32 = {"rtol": 1e-6, "atol": 1e-6}
F64_COST = {"rtol": 1e-9, "atol": 0.0}
F64_ACTIONS = {"rtol": 1e-6, "atol": 1e-6}

# fmt: off
PENDULUM_DATA = {
    "ensemble_train_loss": [0.5438363075256347, 0.5256197929382325, 0.5075837135314941,
        0.48896045684814454, 0.469895601272583],
    "ensemble_val_loss": [0.5498284101486206, 0.5343637466430664, 0.518739640712738,
        0.5023985505104065, 0.48481714725494385],
    "gp_final_train_loss": -0.9300954937934875,
    "x0": [-0.06708691269159317, -0.9977471232414246, 5.5241804122924805],
}

EVALUATE = {
    "ensemble-ts_inf": [-42.441009521484375, -45.90435028076172, -44.988059997558594,
        -41.71794891357422, -58.44843673706055, -43.33320617675781, -45.39663314819336,
        -46.037269592285156, -44.910926818847656, -52.880958557128906, -37.08357238769531,
        -48.591278076171875, -51.62918472290039, -47.37931823730469, -46.904327392578125,
        -36.25933837890625],
    "ensemble-ts1": [-53.98573303222656, -45.042755126953125, -39.58366012573242,
        -42.375885009765625, -43.069183349609375, -51.0255241394043, -46.127540588378906,
        -42.81259536743164, -44.82803726196289, -47.78291320800781, -42.61762619018555,
        -42.335838317871094, -45.67273712158203, -46.12130355834961, -43.71018600463867,
        -39.015724182128906],
    "ensemble-expectation": [-43.547176361083984, -43.610103607177734, -43.667579650878906,
        -43.601539611816406, -43.395713806152344, -43.74474334716797, -43.33560562133789,
        -43.54547882080078, -43.325477600097656, -43.76974105834961, -43.249210357666016,
        -43.58760070800781, -43.63761901855469, -43.483524322509766, -43.80274200439453,
        -43.498748779296875],
    "gp": [-19.32046890258789, -19.456010818481445, -19.638935089111328, -19.51237678527832,
        -19.182296752929688, -19.906192779541016, -19.053340911865234, -18.961090087890625,
        -18.74297332763672, -20.097339630126953, -19.197582244873047, -19.31647300720215,
        -19.598098754882812, -18.9840087890625, -20.501482009887695, -19.244911193847656],
    "mujoco": [-1.6860878467559814, -3.8454320430755615, -3.586991786956787, -2.3309953212738037,
        -0.8494468927383423, 0.002131551504135132, -1.132350206375122, -1.908864974975586,
        -1.1526139974594116, -1.6522104740142822, -3.2551403045654297, -3.9281580448150635,
        -0.609420657157898, -6.637820720672607, -3.6092231273651123, -1.5742837190628052],
    "analytic": [-74.19345092773438, -73.94873046875, -73.61356353759766, -75.46163177490234,
        -73.63782501220703, -74.26536560058594, -74.79237365722656, -75.63554382324219,
        -73.18314361572266, -74.65217590332031, -73.37405395507812, -73.48336791992188,
        -75.03468322753906, -75.78448486328125, -74.34811401367188, -73.38298034667969],
}

PLANS = {  # (the first 12 entries of plan.actions, plan.expected_return)
    ("ensemble", "cem"): ([-0.8891386389732361, -1.0888826847076416, 1.2750850915908813,
        1.0750676393508911, 2.0, 0.44275760650634766, 0.6489168405532837, 0.7848501801490784],
        -34.6386604309082),
    ("ensemble", "rs"): ([-1.5644102096557617, -1.0482628345489502, 1.614985466003418,
        -1.6230933666229248, -0.14361238479614258, 1.9784774780273438, 0.7224740982055664,
        0.056626081466674805], -37.3305778503418),
    ("ensemble", "mppi"): ([0.19654449820518494, -0.19571293890476227, 0.2528333067893982,
        0.37287062406539917, -0.19515368342399597, -0.1631820946931839, 0.0017361678183078766,
        0.04394790902733803], -50.35480880737305),
    ("gp", "cem"): ([-1.2415900230407715, -1.381306529045105, -0.30981630086898804,
        0.2496979981660843, -0.6322324275970459, 0.3330981433391571, 0.8041655421257019,
        -0.6385621428489685], -18.513050079345703),
    ("gp", "rs"): ([-1.905196189880371, -0.03594827651977539, -1.506117820739746,
        -1.5427134037017822, -0.1101992130279541, 0.3002901077270508, -0.8190605640411377,
        1.1867551803588867], -18.433826446533203),
    ("gp", "mppi"): ([-0.1816234141588211, -0.2777407765388489, 0.009917344897985458,
        0.19536569714546204, -0.017961010336875916, -0.1443766951560974, 0.07645954191684723,
        -0.12902005016803741], -18.990447998046875),
    ("mujoco", "cem"): ([-0.5629199147224426, -0.576180100440979, -0.12528929114341736,
        -0.21693940460681915, 0.4243551790714264, 0.34600457549095154, -0.15800638496875763, -1.0,
        0.16113746166229248, -0.6316673755645752, 0.17499159276485443, 0.15406696498394012],
        1.3959062099456787),
    ("mujoco", "rs"): ([-0.4769160747528076, -0.18036365509033203, -0.2675527334213257,
        -0.8785061836242676, -0.17629313468933105, 0.3061167001724243, -0.40605759620666504,
        -0.04261982440948486, -0.004783511161804199, -0.9955048561096191, 0.7267163991928101,
        0.8077727556228638], 1.0884652137756348),
    ("mujoco", "mppi"): ([-0.19529515504837036, 0.1729947179555893, -0.0656484067440033,
        -0.16123002767562866, 0.27247774600982666, 0.2781611979007721, -0.2944719195365906,
        -0.3812476396560669, -0.03731950372457504, -0.1108725368976593, -0.060934364795684814,
        -0.29200974106788635], -0.08842669427394867),
    ("analytic", "cem"): ([-1.051840901374817, -0.21779978275299072, -2.0, -2.0,
        -0.23315374553203583, -1.2120097875595093, -0.11524850130081177, -1.0809937715530396],
        -72.21089172363281),
    ("analytic", "rs"): ([-1.7966430187225342, -0.9481544494628906, 1.3618104457855225,
        -0.012964963912963867, -0.9940927028656006, -1.532623529434204, -1.8717041015625,
        -1.688016414642334], -72.49400329589844),
    ("analytic", "mppi"): ([-0.10284672677516937, 0.08554498106241226, -0.17242592573165894,
        -0.08527100831270218, 0.060568347573280334, -0.22306284308433533, 0.3134734630584717,
        -0.3840407729148865], -73.80549621582031),
}

MUJOCO_X0 = [-0.047677572816610336, -0.040301769971847534, 0.0628451481461525, -0.08161681145429611,
    0.020020104944705963, 0.04571210592985153, -0.06241978704929352, -0.08897067606449127,
    -0.045006126165390015, -0.05538228526711464, 0.09775674343109131, -0.03105565533041954,
    -0.032882388681173325, -0.0792146772146225, 0.045495808124542236, -0.009919805452227592,
    0.054528869688510895, -0.06071856990456581]

ENSEMBLE_MPC = {
    "rewards": [-6.805683135986328, -7.119663238525391, -7.415031433105469, -7.751420021057129,
        -8.132278442382812, -8.629267692565918, -9.260382652282715, -10.0092191696167,
        -9.94256591796875, -9.386958122253418, -8.735581398010254, -8.12195873260498],
    "actions": [-0.2448502480983734, 1.7445045709609985, 1.4016666412353516, 1.0724847316741943,
        -0.0240323543548584, -0.7977924942970276, -1.1542603969573975, 1.4874759912490845, -2.0,
        0.212514728307724, 2.0, -0.5372029542922974],
}

ILQR_SWINGUP = {
    "initial_cost": 357.0803132040831,
    "cost": 171.5673675212643,
    "actions": [2.0, -2.0, -2.0, 2.0, 2.0, 2.0, 2.0, 0.475263673115528, 0.08764092562737394,
        0.022014280207488496],
    "final_state": [6.278874776777962, 0.004201953958869169],
}

ILQR_COLD = {
    "initial_cost": 200.9358603837385,
    "cost": 190.78408570445188,
    "actions": [-0.350243464490983, -0.05900713631568433, -0.11179387125405321,
        -0.14735686396373976, -0.16974912680669546, -0.18536312876414063, -1.74605624654527, -2.0,
        -2.0, -2.0],
}

LQR_UPRIGHT = {
    "actions": [-2.0, -2.0, -1.3239605024044927, -0.8931584868112963, -0.622205591113836,
        -0.4483525073679506, -0.33393313038358663, -0.25632179479576256, -0.20188793989001463,
        -0.16237294785480028],
    "K": [-12.966160015192328, -3.2821490459920595],
    "return": -0.8505926040574096,
}
# fmt: on


# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(actual, expected, **tol) -> None:
    actual = torch.as_tensor(np.asarray(actual) if not torch.is_tensor(actual) else actual)
    actual = actual.detach().double().flatten()
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), **tol)


def _value_kwargs(value_fn) -> dict:
    """The terminal value as the problem's keyword: ``value_fn(state)``; the pre-revision
    ``PlanningProblem`` only had ``terminal_reward_fn(obs)``, which gets the same function."""
    if "value_fn" in inspect.signature(PlanningProblem).parameters:
        return {"value_fn": value_fn}
    return {"terminal_reward_fn": lambda obs: value_fn(RolloutState(obs=obs))}


def _initial_guess(actions: torch.Tensor):
    """An initial guess ``[H, U]`` as a planner's warm start (a ``WarmStart``; before the
    revision, the tensor itself)."""
    try:
        from mbrl.planners.base import WarmStart
    except ImportError:
        return actions
    return WarmStart(actions)


def _system_model(system: AnalyticSystem):
    """The system's exact model: ``mbrl.dynamics.systems.SystemModel`` (before the revision,
    ``system.model()``)."""
    try:
        from mbrl.dynamics.systems import SystemModel
    except ImportError:
        return system.model()
    return SystemModel(system)


def _terminal_value(system: AnalyticSystem):
    """Minus the system's terminal cost, as a value of rollout states."""
    return lambda state: -system.terminal_cost(state.obs)


def _problem(spec: EnvSpec, model, particles: int, value_fn=None) -> PlanningProblem:
    extra = {} if value_fn is None else _value_kwargs(value_fn)
    return PlanningProblem(
        model,
        spec.reward_fn,
        spec.termination_fn,
        H,
        torch.as_tensor(spec.action_low),
        torch.as_tensor(spec.action_high),
        particles,
        torch.Generator().manual_seed(0),
        **extra,
    )


def _system_problem(system: AnalyticSystem, horizon: int) -> PlanningProblem:
    return PlanningProblem(
        _system_model(system),
        system.reward_fn(),
        None,
        horizon,
        system.action_low,
        system.action_high,
        **_value_kwargs(_terminal_value(system)),
    )


def _candidates(spec: EnvSpec) -> torch.Tensor:
    """``N`` uniform candidates ``[N, H, U]`` within the bounds, seed 1."""
    g = torch.Generator().manual_seed(1)
    low = torch.as_tensor(spec.action_low, dtype=torch.float32)
    high = torch.as_tensor(spec.action_high, dtype=torch.float32)
    return low + (high - low) * torch.rand(N, H, len(low), generator=g)


def _planners() -> dict:
    return {
        "cem": CEM(population=32, elite_fraction=0.25, iterations=3),
        "rs": RandomShooting(population=32),
        "mppi": MPPI(population=32, temperature=1.0, noise_std=0.5, iterations=2),
    }


@pytest.fixture(scope="module")
def pendulum_data() -> tuple[EnvSpec, Transitions]:
    """200 transitions of Pendulum-v1 (reset seed 0) under a uniform policy (numpy seed 0)."""
    spec = make("pendulum")
    policy = RandomPolicy(spec.action_low, spec.action_high, np.random.default_rng(0))
    ep = run_episode(spec.make(), policy, seed=0, max_steps=200)
    obs = torch.as_tensor(ep.obs)
    data = Transitions(
        obs[:-1],
        torch.as_tensor(ep.act),
        obs[1:],
        torch.as_tensor(ep.reward),
        torch.as_tensor(ep.terminated),
    )
    return spec, data


@pytest.fixture(scope="module")
def ensemble(pendulum_data):
    """4 members of 2 x 32 units, seed 0, fitted for 5 epochs; returns (model, FitReport)."""
    torch.set_num_threads(1)
    _, data = pendulum_data
    model = ProbabilisticEnsemble(
        3, 1, ensemble_size=4, hidden_size=32, num_layers=2, max_epochs=5, seed=0
    )
    report = model.fit(data)
    return model, report


@pytest.fixture(scope="module")
def gp(pendulum_data):
    """An exact GP (RBF, seed 0) fitted for 30 Adam steps on the first 120 transitions."""
    torch.set_num_threads(1)
    _, data = pendulum_data
    fields = (data.obs, data.act, data.next_obs, data.reward, data.terminated)
    model = GaussianProcessModel(3, 1, iterations=30, seed=0)
    report = model.fit(Transitions(*(t[:120] for t in fields)))
    return model, report


@pytest.fixture(scope="module")
def cheetah():
    """HalfCheetah's MuJoCo ground truth (one thread) and a start from ``reset(seed=2)``."""
    spec = make("half-cheetah")
    model = MujocoModel.from_spec(spec, nthread=1)
    obs, _ = spec.make().reset(seed=2)
    yield spec, model, torch.as_tensor(obs, dtype=torch.float32)
    model.close()


def _case(name: str, request) -> tuple[EnvSpec, PlanningProblem, torch.Tensor]:
    """``(spec, problem factory, x0)`` of a model case; the ensemble plans with ``ts_inf``."""
    if name in ("ensemble", "gp"):
        spec, data = request.getfixturevalue("pendulum_data")
        model = request.getfixturevalue(name)[0]
        if name == "ensemble":
            model.propagation = "ts_inf"
        particles = 4 if name == "ensemble" else 2
        return spec, (lambda: _problem(spec, model, particles)), data.obs[17]
    if name == "mujoco":
        spec, model, x0 = request.getfixturevalue("cheetah")
        return spec, (lambda: _problem(spec, model, 1)), x0
    system = SYSTEMS["pendulum"]()
    spec, model, value = system.spec(), _system_model(system), _terminal_value(system)
    x0 = torch.tensor([math.pi - 0.3, 0.5], dtype=torch.float32)
    return spec, (lambda: _problem(spec, model, 1, value)), x0


# ---------------------------------------------------------------- models


def test_pendulum_data_and_fits(pendulum_data, ensemble, gp):
    """Pins the collected data (the start ``x0`` = obs 17 used below), the ensemble's per-epoch
    train and validation losses and the GP's final training loss (pre-revision code, commit
    f795a6c, same seeds), so that a change in data or fitting is told apart from one in
    planning."""
    _, data = pendulum_data
    _close(data.obs[17], PENDULUM_DATA["x0"], **F32)
    _close(ensemble[1].train_loss, PENDULUM_DATA["ensemble_train_loss"], **F32)
    _close(ensemble[1].val_loss, PENDULUM_DATA["ensemble_val_loss"], **F32)
    _close(gp[1].train_loss[-1], [PENDULUM_DATA["gp_final_train_loss"]], **F32)


@pytest.mark.parametrize("propagation", ["ts_inf", "ts1", "expectation"])
def test_ensemble_evaluate(pendulum_data, ensemble, propagation):
    """Pins ``PlanningProblem.evaluate(x0, actions)`` of 16 seeded candidates (H = 8, P = 4) on
    the fitted ensemble for each propagation mode; numbers from the pre-revision code (commit
    f795a6c) with the same seeds."""
    spec, data = pendulum_data
    model = ensemble[0]
    model.propagation = propagation
    try:
        returns = _problem(spec, model, 4).evaluate(data.obs[17], _candidates(spec))
    finally:
        model.propagation = "ts_inf"
    _close(returns, EVALUATE[f"ensemble-{propagation}"], **F32)


def test_gp_evaluate(pendulum_data, gp):
    """Pins ``evaluate`` of the 16 seeded candidates (H = 8, P = 2 sampled particles) on the
    fitted GP; numbers from the pre-revision code (commit f795a6c) with the same seeds."""
    spec, data = pendulum_data
    returns = _problem(spec, gp[0], 2).evaluate(data.obs[17], _candidates(spec))
    _close(returns, EVALUATE["gp"], **F32)


def test_mujoco_evaluate(cheetah):
    """Pins ``evaluate`` of 16 seeded candidates (H = 8) on HalfCheetah's MuJoCo ground truth
    from ``reset(seed=2)``; numbers from the pre-revision code (commit f795a6c)."""
    spec, model, x0 = cheetah
    _close(x0, MUJOCO_X0, **F32)
    _close(_problem(spec, model, 1).evaluate(x0, _candidates(spec)), EVALUATE["mujoco"], **F32)


def test_analytic_evaluate():
    """Pins ``evaluate`` of 16 seeded candidates (H = 8) on the analytic pendulum from
    ``[pi - 0.3, 0.5]``, the terminal cost counted as the value; numbers from the pre-revision
    code (commit f795a6c, there as ``terminal_reward_fn``)."""
    system = SYSTEMS["pendulum"]()
    spec = system.spec()
    problem = _problem(spec, _system_model(system), 1, _terminal_value(system))
    x0 = torch.tensor([math.pi - 0.3, 0.5], dtype=torch.float32)
    _close(problem.evaluate(x0, _candidates(spec)), EVALUATE["analytic"], **F32)


# ---------------------------------------------------------------- sampling planners


@pytest.mark.parametrize("planner", ["cem", "rs", "mppi"])
@pytest.mark.parametrize("model", ["ensemble", "gp", "mujoco", "analytic"])
def test_sampling_plan(model, planner, request):
    """Pins one cold plan (``plan(problem, x0)``, no warm start, problem generator seed 0) of
    CEM (32 x 3 iterations, 8 elites), random shooting (32) and MPPI (32 x 2, temperature 1,
    noise 0.5) on every model: the first 12 action entries and the expected return; numbers
    from the pre-revision code (commit f795a6c) with the same seeds."""
    _, make_problem, x0 = _case(model, request)
    plan = _planners()[planner].plan(make_problem(), x0)
    actions, expected_return = PLANS[(model, planner)]
    _close(plan.actions.flatten()[:12], actions, **F32)
    _close(plan.expected_return, [expected_return], **F32)


def test_ensemble_mpc_episode(pendulum_data, ensemble):
    """Pins a 12-step closed loop of ``MPCController(CEM, problem)`` on the fitted ensemble
    (ts_inf, P = 4) in Pendulum-v1 reset with seed 3: the rewards and actions played (every
    plan after the first is warm-started by the controller); numbers from the pre-revision code
    (commit f795a6c) with the same seeds."""
    spec, _ = pendulum_data
    model = ensemble[0]
    model.propagation = "ts_inf"
    planner = CEM(population=32, elite_fraction=0.25, iterations=3)
    ctrl = MPCController(planner, _problem(spec, model, 4))
    ep = run_episode(spec.make(), ctrl, seed=3, max_steps=12)
    _close(ep.reward, ENSEMBLE_MPC["rewards"], **F32)
    _close(ep.act, ENSEMBLE_MPC["actions"], **F32)


# ---------------------------------------------------------------- gradient planners


def test_ilqr_pendulum_swingup():
    """Pins iLQR's pendulum swing-up from hanging down (H = 80, initial guess constant torque
    1, run to ``tol_rel_cost = 1e-12``): the initial and final costs, every 8th action and the
    final state; numbers from the pre-revision code (commit f795a6c, the terminal cost there
    as ``terminal_reward_fn``), where it converged in 26 iterations to a swing-up."""
    system = SYSTEMS["pendulum"]()
    h = 80
    guess = _initial_guess(torch.full((h, 1), 1.0, dtype=torch.float64))
    plan = ILQR(max_iterations=200, tol_rel_cost=1e-12).plan(
        _system_problem(system, h), torch.tensor(system.start, dtype=torch.float64), guess
    )
    _close(plan.diagnostics["initial_cost"], [ILQR_SWINGUP["initial_cost"]], **F64_COST)
    _close(plan.diagnostics["cost"], [ILQR_SWINGUP["cost"]], **F64_COST)
    _close(plan.actions[::8], ILQR_SWINGUP["actions"], **F64_ACTIONS)
    _close(plan.x_ref[-1], ILQR_SWINGUP["final_state"], **F64_ACTIONS)
    assert system.success(plan.x_ref[-1].numpy())


def test_ilqr_pendulum_cold_four_iterations():
    """Pins four iLQR iterations from the all-zero initial guess from ``[pi - 0.2, 0]``
    (H = 40): the initial and final costs and every 4th action, i.e. the iteration path; numbers
    from the pre-revision code (commit f795a6c)."""
    system = SYSTEMS["pendulum"]()
    x0 = torch.tensor([math.pi - 0.2, 0.0], dtype=torch.float64)
    # The zeros are passed explicitly: the pinned case was plan(problem, x0) with no guess,
    # which then meant zeros. Without a guess iLQR now starts from the cheaper of zeros and its
    # regulator guess (the fix for the swing-around from near upright); here that is the
    # regulator guess, initial cost 199.47398604080217 instead of 200.9358603837385, and four
    # iterations end at 193.29498827237876 instead of 190.78408570445188. The iterations from
    # the same guess are unchanged, which is what this pins.
    zeros = _initial_guess(torch.zeros(40, 1, dtype=torch.float64))
    plan = ILQR(max_iterations=4).plan(_system_problem(system, 40), x0, zeros)
    _close(plan.diagnostics["initial_cost"], [ILQR_COLD["initial_cost"]], **F64_COST)
    _close(plan.diagnostics["cost"], [ILQR_COLD["cost"]], **F64_COST)
    _close(plan.actions[::4], ILQR_COLD["actions"], **F64_ACTIONS)


def test_lqr_pendulum_near_upright():
    """Pins LQR's plan on the pendulum from ``[0.3, -0.4]`` (H = 10, gain from the cost Hessian
    at the upright goal): the actions, the gain and the expected return (terminal cost
    included); numbers from the pre-revision code (commit f795a6c)."""
    system = SYSTEMS["pendulum"]()
    x0 = torch.tensor([0.3, -0.4], dtype=torch.float64)
    plan = LQR(goal=system.goal).plan(_system_problem(system, 10), x0)
    _close(plan.actions, LQR_UPRIGHT["actions"], **F64_ACTIONS)
    _close(plan.K[0], LQR_UPRIGHT["K"], **F64_ACTIONS)
    _close(plan.expected_return, [LQR_UPRIGHT["return"]], **F64_COST)
