"""``mbrl sweep``: seeds and value lists expanded into ordinary runs, run on a local pool and on
Ray, with the same numbers as each run alone; a killed run resumes from its checkpoint; a
Ctrl-C stops every run at a checkpoint and ``--resume`` completes the sweep; the report."""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from state_compare import assert_same

from mbrl import cli
from mbrl.runs import load_checkpoint_file
from mbrl.sweep import (
    LiveView,
    Manifest,
    RunRecord,
    RunSpec,
    SweepFolderError,
    estimate,
    expand,
    parse_seeds,
    run_sweep,
    sweep_report,
    t_test_p,
)
from mbrl.sweep.execute import STOP, Attempt, attempt, holding
from mbrl.sweep.plan import split_values

torch.set_num_threads(1)

TINY = ["--env", "cartpole-balance", "trials=2", "seed_steps=30", "horizon=5", "particles=2",
        "planner.population=20", "planner.iterations=2", "model.ensemble_size=2",
        "model.hidden_size=16", "model.num_layers=2", "model.max_epochs=2"]  # fmt: skip
SEEDS = range(4)
TIMING = ("seconds", "wall", "steps_per_s", "checkpoint_mb")


# -- expanding a sweep ----------------------------------------------------------------------------


def test_seeds_ranges_lists_and_mixed():
    assert parse_seeds("0-3") == (0, 1, 2, 3)
    assert parse_seeds("0,2,5") == (0, 2, 5)
    assert parse_seeds("0-2,7,10-11") == (0, 1, 2, 7, 10, 11)


@pytest.mark.parametrize(
    "text, message",
    [
        ("3-1", "the range 3-1 goes down; write 1-3"),
        ("0,x", "'x' is not a seed or a range"),
        ("0-2,1", "gives seed(s) 1 more than once"),
        ("", "'' is not a seed"),
        ("-1", "'-1' is not a seed"),
    ],
)
def test_bad_seeds_are_refused_with_the_fix(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_seeds(text)


def test_value_lists_split_outside_brackets_and_quotes():
    assert split_values("horizon=10,20") == ("horizon", ("10", "20"))
    assert split_values("model.sizes=[1,2],[3,4]") == ("model.sizes", ("[1,2]", "[3,4]"))
    assert split_values("name='a,b'") == ("name", ("'a,b'",))
    assert split_values("trials=3") == ("trials", ("3",))
    with pytest.raises(ValueError, match="an empty value in its list"):
        split_values("horizon=5,,6")


def test_expand_names_runs_after_what_varies():
    runs = expand(["pets"], (0, 3), ["horizon=10,20", "trials=1"], env="cartpole-balance")
    assert [r.name for r in runs] == [
        "pets-cartpole-balance-horizon10-seed0",
        "pets-cartpole-balance-horizon10-seed3",
        "pets-cartpole-balance-horizon20-seed0",
        "pets-cartpole-balance-horizon20-seed3",
    ]
    assert [r.setting for r in runs] == ["pets horizon=10"] * 2 + ["pets horizon=20"] * 2
    assert runs[1].argv == (
        "run", "pets", "--env", "cartpole-balance", "--seed", "3", "trials=1", "horizon=10"
    )  # fmt: skip
    assert {r.env for r in runs} == {"cartpole-balance"}


def test_expand_checks_every_run_as_mbrl_run_does():
    with pytest.raises(ValueError, match=r"sweep setting 'pets horizon=0'.*horizon must be"):
        expand(["pets"], (0,), ["horizon=5,0"], env="cartpole-balance")
    with pytest.raises(ValueError, match="unknown config key.*horizn; valid keys"):
        expand(["pets"], (0,), ["horizn=5,6"], env="cartpole-balance")
    with pytest.raises(ValueError, match="give the seeds with --seeds"):
        expand(["pets"], (0,), ["seed=1,2"])
    with pytest.raises(ValueError, match="horizon is given twice"):
        expand(["pets"], (0,), ["horizon=5", "horizon=6,7"])
    with pytest.raises(ValueError, match="'horizon=5,6,5' lists 5 twice"):
        expand(["pets"], (0,), ["horizon=5,6,5"])


def test_cli_refuses_bad_sweeps_before_making_a_folder(tmp_path, monkeypatch, capsys):
    base = ["sweep", "pets", *TINY, "--runs-dir", str(tmp_path)]
    cases = [
        (["--seeds", "4-2"], "--seeds '4-2': the range 4-2 goes down"),
        (["--seeds", "0", "--cpus-per-run", "0"], "--cpus-per-run must be an integer >= 1, got 0"),
        (["--seeds", "0", "stop_when_solved=1,x"], "sweep setting 'pets stop_when_solved=x'"),
        (["--seeds", "0", "--cpus-per-run", "100000"], "--cpus-per-run 100000 exceeds the"),
    ]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["sweep", "pets", "--env", "cartpole-balance"]) == 2
    assert "mbrl sweep needs ALGO and --seeds" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    assert cli.main([*base, "--seeds", "0", "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert "mbrl sweep --backend ray needs ray: pip install 'torch-mbrl[ray]'" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert cli.main(["sweep", "--resume", str(tmp_path)]) == 2
    assert "is not a sweep folder (no sweep.yaml in it)" in capsys.readouterr().err
    assert cli.main(["sweep", "--resume", str(tmp_path), "--seeds", "1"]) == 2
    assert "--resume takes the sweep as it was made; drop --seeds" in capsys.readouterr().err


# -- retries, on a pool that runs nothing -------------------------------------------------------


class _ScriptedPool:
    """Each attempt of run ``name`` ends with the next exit status in ``codes[name]``; the
    first attempt makes the run folder (``run.yaml``), as ``mbrl run`` does."""

    slots, startup_seconds = 2, 0.0

    def __init__(self, codes):
        self.codes = {k: list(v) for k, v in codes.items()}
        self.calls = []

    def submit(self, name, argv, threads, folder):
        self.calls.append((name, argv[0]))
        run = Path(folder) / name
        run.mkdir(exist_ok=True)
        (run / "run.yaml").write_text("algo: pets\n")
        with (Path(folder) / "logs" / f"{name}.log").open("a") as f:
            f.write("== attempt\nValueError: boom\n")
        future = Future()
        future.set_result(Attempt(name, self.codes[name].pop(0), 0.0, "ValueError: boom"))
        return future

    def close(self):
        pass


def _manifest(names, retries=1, setting="pets"):
    runs = tuple(
        RunRecord(RunSpec(n, setting, "pets", "cartpole-balance", i, ("run", "pets")))
        for i, n in enumerate(names)
    )
    return Manifest("t", ("pets",), "local", 1, retries, None, None, runs)


def test_a_crashing_run_is_retried_by_resuming_and_reported_the_others_go_on(tmp_path):
    pool = _ScriptedPool({"bad": [1, 1], "killed": [-signal.SIGKILL, 0], "good": [0]})
    result = run_sweep(tmp_path, _manifest(["bad", "killed", "good"]), pool)
    runs = {r.spec.name: r for r in result.manifest.runs}
    assert (runs["bad"].state, runs["bad"].attempts) == ("failed", 2)
    assert runs["bad"].error == "exit status 1: ValueError: boom"
    assert (runs["killed"].state, runs["killed"].attempts, runs["killed"].error) == (
        "done",
        2,
        None,
    )
    assert (runs["good"].state, runs["good"].attempts) == ("done", 1)
    assert ("killed", "resume") in pool.calls  # the retry continues the started folder
    assert Manifest.load(tmp_path) == result.manifest
    # a later sweep of the folder gives the failed run fresh retries and leaves done runs alone
    again = _ScriptedPool({"bad": [0]})
    result = run_sweep(tmp_path, result.manifest, again)
    assert again.calls == [("bad", "resume")]
    assert {r.state for r in result.manifest.runs} == {"done"}
    assert [r.attempts for r in result.manifest.runs] == [3, 2, 1]


def test_one_process_runs_a_sweep_folder_at_a_time(tmp_path):
    with holding(tmp_path):
        with pytest.raises(SweepFolderError, match=f"is being run by process {os.getpid()}"):
            run_sweep(tmp_path, _manifest(["a"]), _ScriptedPool({"a": [0]}))
    result = run_sweep(tmp_path, _manifest(["a"]), _ScriptedPool({"a": [0]}))  # free again
    assert result.manifest.counts()["done"] == 1


def test_live_view_plain_lines_on_change_and_a_table_on_a_terminal():
    m = _manifest(["a", "b"])
    stream = io.StringIO()
    view = LiveView(stream, table=False)
    view(m)
    assert stream.getvalue() == ""  # nothing changed yet
    a = m.runs[0].__class__(m.runs[0].spec, "running", 1, 12.5)
    m2 = Manifest(**{**m.__dict__, "runs": (a, m.runs[1])})
    view(m2)
    view(m2)
    assert stream.getvalue() == (
        "sweep t: 0/2 done, 1 running, 0 failed, 1 pending | a: running, attempt 1, return 12.5\n"
    )
    tty = io.StringIO()
    table = LiveView(tty, table=True)
    table(m2)
    table(m2)
    assert tty.getvalue().count("a: running") == 2 and "\x1b[2F\x1b[J" in tty.getvalue()


# -- the report --------------------------------------------------------------------------------


def test_t_test_p_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 8, 13, 30):
        for t in (0.0, 0.3, 1.0, 2.2, 5.0, -3.1):
            assert t_test_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)


def _fake_sweep(folder: Path, finals: dict[str, list[float]]) -> Manifest:
    """A sweep folder of done runs with hand-written metrics: each run's return rises linearly
    from 0 to its final value over env steps 0, 10, 20."""
    records = []
    for setting, values in finals.items():
        for seed, final in enumerate(values):
            name = f"{setting}-seed{seed}"
            spec = RunSpec(name, setting, "pets", "cartpole-balance", seed, ("run", "pets"))
            (folder / name).mkdir(parents=True)
            with (folder / name / "metrics.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["env_steps", "return"])
                w.writerows([[0, 0.0], [10, final / 2], [20, final]])
            records.append(RunRecord(spec, "done", 1, final))
    manifest = Manifest("fake", ("pets",), "local", 1, 0, None, 15.0, tuple(records))
    manifest.save(folder)
    return manifest


def test_report_table_paired_comparison_and_plot(tmp_path):
    stats = pytest.importorskip("scipy.stats")
    a, b = [10.0, 20.0, 30.0, 25.0], [14.0, 21.0, 38.0, 30.0]
    _fake_sweep(tmp_path, {"A": a, "B": b})
    report = sweep_report(tmp_path)
    sa = report.settings[0]
    assert (sa.setting, sa.done) == ("A", 4)
    assert sa.final.mean == pytest.approx(np.mean(a))
    assert sa.final.se == pytest.approx(np.std(a, ddof=1) / 2)
    assert sa.final.low < sa.final.mean < sa.final.high
    assert sa.curve.mean == pytest.approx(np.mean(a) / 2)  # the mean of 0, final/2, final
    # threshold 15 (the sweep's own): first at env step 10 where final / 2 >= 15, else at 20
    # where final >= 15, else never
    assert sa.reached == 3 and sa.first.mean == pytest.approx((20 + 10 + 20) / 3)
    assert report.settings[1].reached == 3
    final = next(c for c in report.comparisons if c.metric == "final return")
    assert final.diff == pytest.approx(np.mean(np.subtract(b, a)))
    assert final.p == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert final.ahead == 4
    text = (tmp_path / "report.md").read_text()
    assert "| B - A | 4 | +4.5 ± " in text and "first env step with return >= 15" in text
    assert (tmp_path / "report.png").stat().st_size > 0


def test_estimate_of_one_run_has_no_standard_error():
    e = estimate([3.0])
    assert (e.mean, e.low, e.high) == (3.0, 3.0, 3.0) and math.isnan(e.se)


# -- real sweeps ------------------------------------------------------------------------------


def _rows(path):
    with open(path / "metrics.csv", newline="") as f:
        return [
            {k: v for k, v in r.items() if not any(t in k for t in TIMING)}
            for r in csv.DictReader(f)
        ]


def _state(path):
    state = load_checkpoint_file(path / "checkpoint.pt")["state"]
    state["counters"].pop("wall_seconds")
    return state


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """Each seed's run on its own (``mbrl run``, one torch thread), by seed."""
    root = tmp_path_factory.mktemp("alone")
    for s in SEEDS:
        assert cli.main(["run", "pets", *TINY, "--seed", str(s), "--runs-dir", str(root),
                         "--name", f"seed{s}"]) == 0  # fmt: skip
    return {s: root / f"seed{s}" for s in SEEDS}


def _assert_runs_equal_alone(folder: Path, alone, seeds=SEEDS):
    for s in seeds:
        run = folder / f"pets-cartpole-balance-seed{s}"
        assert _rows(run) == _rows(alone[s]), s
        assert_same(_state(run), _state(alone[s]), f"seed {s}")


def _watch(path: Path, deadline: float = 120.0) -> bool:
    end = time.monotonic() + deadline
    while not path.exists():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def _writer_pid(run: Path) -> int:
    return int((run / "run.lock").read_text().split()[0])


def test_local_sweep_with_a_killed_run_equals_the_runs_alone(tmp_path, alone, capsys):
    folder = tmp_path / "sweep-local"
    killed = folder / "pets-cartpole-balance-seed1"
    pids = []

    def kill_after_first_checkpoint():
        if _watch(killed / "checkpoint-1.pt"):
            pids.append(_writer_pid(killed))
            os.kill(pids[0], signal.SIGKILL)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    argv = ["sweep", "pets", *TINY, "--seeds", "0-3", "--runs-dir", str(tmp_path)]
    assert cli.main([*argv, "--name", "local", "--threshold", "30"]) == 0
    watcher.join()
    manifest = Manifest.load(folder)
    assert [r.state for r in manifest.runs] == ["done"] * 4
    assert [r.attempts for r in manifest.runs] == [1, 2, 1, 1]
    log = (folder / "logs" / f"{killed.name}.log").read_text()
    assert f"mbrl resume {killed}" in log and "resumed" in log  # from its own checkpoint
    _assert_runs_equal_alone(folder, alone)
    for r in manifest.runs:
        assert r.last_return == float(_rows(alone[r.spec.seed])[-1]["return"])
    out = capsys.readouterr().out
    assert "| pets | 4 of 4 |" in out and (folder / "report.png").exists()
    assert "first env step with return >= 30" in (folder / "report.md").read_text()


def test_ray_sweep_equals_the_runs_alone(tmp_path, alone, capsys):
    pytest.importorskip("ray")
    argv = ["sweep", "pets", *TINY, "--seeds", "1,2", "--runs-dir", str(tmp_path)]
    assert cli.main([*argv, "--name", "ray", "--backend", "ray"]) == 0
    folder = tmp_path / "sweep-ray"
    assert [r.state for r in Manifest.load(folder).runs] == ["done"] * 2
    _assert_runs_equal_alone(folder, alone, seeds=(1, 2))
    assert "Ray start-up" in capsys.readouterr().err


def _pending(pid: int) -> int:
    """The signals pending for process ``pid`` (its ShdPnd mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_ctrl_c_stops_every_run_at_a_checkpoint_and_resume_completes(tmp_path, alone, capsys):
    """One run is frozen (SIGSTOP) just after its first checkpoint while the sweep gets a
    Ctrl-C, and thawed once the sweep has passed the SIGINT on: it stops at its next
    checkpoint, intact; ``--resume`` completes the sweep with the numbers of the runs alone."""
    folder = tmp_path / "sweep-stop"
    first = folder / "pets-cartpole-balance-seed0"
    seen = {}

    def ctrl_c_after_first_checkpoint():
        if not _watch(first / "checkpoint-1.pt"):
            return
        pid = _writer_pid(first)
        os.kill(pid, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGINT)  # the sweep, in this process's main thread
        end = time.monotonic() + 60
        while not _pending(pid) & (1 << (signal.SIGINT - 1)) and time.monotonic() < end:
            time.sleep(0.01)
        seen["stop file"] = (folder / STOP).exists()
        os.kill(pid, signal.SIGCONT)

    watcher = threading.Thread(target=ctrl_c_after_first_checkpoint, daemon=True)
    watcher.start()
    argv = ["sweep", "pets", *TINY, "--seeds", "0,3", "--runs-dir", str(tmp_path)]
    assert cli.main([*argv, "--name", "stop"]) == 130
    watcher.join()
    assert seen == {"stop file": True}
    assert "continue with `mbrl sweep --resume" in capsys.readouterr().err
    runs = Manifest.load(folder).runs
    assert (runs[0].state, runs[0].attempts) == ("pending", 1)
    assert len(_rows(first)) < len(_rows(alone[0]))  # stopped before its end
    for r in runs:
        if (folder / r.spec.name / "checkpoint.pt").exists():
            load_checkpoint_file(folder / r.spec.name / "checkpoint.pt")  # intact
    assert cli.main(["sweep", "--resume", str(folder)]) == 0
    assert [r.state for r in Manifest.load(folder).runs] == ["done", "done"]
    _assert_runs_equal_alone(folder, alone, seeds=(0, 3))


def test_no_run_starts_once_the_sweep_is_stopping(tmp_path):
    (tmp_path / STOP).touch()
    result = attempt("r", ["run", "pets"], 1, str(tmp_path))
    assert result == Attempt("r", None, 0.0, "") and not (tmp_path / "logs").exists()
