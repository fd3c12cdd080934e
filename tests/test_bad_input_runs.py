"""Run folders and checkpoints under bad input: flipped bits, two writers, refused values,
Ctrl-C, a full disk, missing files, names that leave the runs folder, checkpoint size.

Every case goes through the CLI (``mbrl.cli.main``) or the public API and asserts the
refusal and its message."""

from __future__ import annotations

import csv
import errno
import io
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass

import pytest
import torch
import yaml

from mbrl import cli, runs
from mbrl.algorithms import mpc_loop, pets
from mbrl.buffer import ReplayBuffer
from mbrl.runs import CheckpointError, Run, RunFolderError, load_checkpoint_file

torch.set_num_threads(1)

TINY = ["pets", "--env", "cartpole-balance", "trials=2", "seed_steps=30", "horizon=5",
        "particles=2", "planner.population=20", "planner.iterations=2", "model.ensemble_size=2",
        "model.hidden_size=16", "model.num_layers=2", "model.max_epochs=2"]  # fmt: skip


def _rows(path):
    with open(path / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished tiny PETS run: checkpoints 1 (random episodes), 2 (trial 1), 3 (trial 2);
    the last two kept."""
    root = tmp_path_factory.mktemp("ref")
    assert cli.main(["run", *TINY, "--runs-dir", str(root), "--name", "ref"]) == 0
    return root / "ref"


def _copy(run, dst):
    """A copy of a run folder in which checkpoint.pt is again a second name of the newest."""
    shutil.copytree(run, dst)
    newest = max(dst.glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    (dst / "checkpoint.pt").unlink()
    os.link(newest, dst / "checkpoint.pt")
    return dst


def _tensor_bytes(data: bytes) -> list[tuple[int, int]]:
    """``(offset, size)`` in the file of every tensor's data record of a checkpoint."""
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if "/data/" in info.filename and info.file_size:
                off = info.header_offset
                name_len = int.from_bytes(data[off + 26 : off + 28], "little")
                extra_len = int.from_bytes(data[off + 28 : off + 30], "little")
                out.append((off + 30 + name_len + extra_len, info.file_size))
    return out


def _flip(data: bytes, position: int, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[position] ^= 1 << bit
    return bytes(flipped)


# ----- 1. bit flips -----------------------------------------------------------------------------


def test_every_single_bit_flip_in_tensor_data_is_refused(reference, tmp_path):
    data = (reference / "checkpoint.pt").read_bytes()
    records = _tensor_bytes(data)
    assert len(records) > 20  # weights, Adam moments, buffer columns, generator states
    rng = random.Random(0)
    target = tmp_path / "checkpoint-3.pt"
    hit = set()
    for _ in range(100):
        offset, size = rng.choice(records)
        hit.add(offset)
        target.write_bytes(_flip(data, offset + rng.randrange(size), rng.randrange(8)))
        with pytest.raises(CheckpointError, match="is corrupt: tensor .* does not match the sha"):
            load_checkpoint_file(target)
    assert len(hit) > len(records) // 2


def test_any_single_bit_flip_is_refused_or_changes_nothing(reference, tmp_path):
    """Anywhere in the file (zip headers, pickle, digests, data): refused, or (a flip in zip
    padding, say) the content read is exactly the one written."""
    data = (reference / "checkpoint.pt").read_bytes()
    original = load_checkpoint_file(reference / "checkpoint.pt")["state"]
    rng = random.Random(1)
    target = tmp_path / "checkpoint-3.pt"
    refused = 0
    for _ in range(40):
        target.write_bytes(_flip(data, rng.randrange(len(data)), rng.randrange(8)))
        try:
            state = load_checkpoint_file(target)["state"]
        except CheckpointError:
            refused += 1
            continue
        _assert_same(state, original)
    assert refused >= 32


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif a == a:  # NaN aside
        assert a == b


@pytest.mark.parametrize("damage", ["flip", "empty", "truncated"])
def test_resume_refuses_a_bad_latest_checkpoint_and_goes_on_from_the_last_good_one(
    reference, tmp_path, capsys, damage
):
    run = _copy(reference, tmp_path / "r")
    latest = run / "checkpoint.pt"  # the same file as checkpoint-3.pt
    data = latest.read_bytes()
    if damage == "flip":
        offset, size = _tensor_bytes(data)[0]
        latest.write_bytes(_flip(data, offset + size // 2, 3))
    else:
        latest.write_bytes(b"" if damage == "empty" else data[: len(data) // 3])
    assert cli.main(["resume", str(run)]) == 2
    err = capsys.readouterr().err
    why = {"flip": "does not match the sha256", "empty": "is empty (0 bytes)",
           "truncated": "corrupt or truncated"}[damage]  # fmt: skip
    assert f"checkpoint {latest} " in err and why in err
    assert f"the last good checkpoint is {run / 'checkpoint-2.pt'}" in err
    assert f"`mbrl resume {run} --from checkpoint-2.pt`" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert cli.main(["resume", str(run), "--from", "checkpoint-2.pt"]) == 0
    assert _rows(run) == _rows(reference)  # trial 2 again, to the same numbers
    assert load_checkpoint_file(latest)["sequence"] == 3


def test_a_bad_only_checkpoint_says_to_start_over(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "r")
    (run / "checkpoint-2.pt").unlink()
    (run / "checkpoint.pt").write_bytes(b"")
    assert cli.main(["resume", str(run)]) == 2
    assert "keeps no other good checkpoint: start the run over" in capsys.readouterr().err
    assert cli.main(["resume", str(run), "--from", "checkpoint-7.pt"]) == 2
    assert "keeps no such checkpoint; kept: checkpoint-3.pt" in capsys.readouterr().err


def test_keep_checkpoints_and_keep_every_are_stored_and_honoured(tmp_path, capsys):
    argv = ["run", *TINY, "trials=1", "--runs-dir", str(tmp_path)]
    assert cli.main([*argv, "--name", "k", "--keep-checkpoints", "1", "--keep-every", "1"]) == 0
    meta = yaml.safe_load((tmp_path / "k" / "run.yaml").read_text())
    assert meta["keep_checkpoints"] == 1 and meta["keep_every"] == 1
    assert sorted(p.name for p in (tmp_path / "k").glob("checkpoint-*.pt")) == [
        "checkpoint-1.pt",
        "checkpoint-2.pt",
    ]
    assert cli.main([*argv, "--name", "z", "--keep-checkpoints", "0"]) == 2
    assert "--keep-checkpoints 0" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


# ----- 2. one writer per run folder --------------------------------------------------------------


@dataclass
class _Cfg:
    steps: int = 3


def test_a_run_being_written_by_another_process_is_refused(reference, tmp_path, capsys):
    run = _copy(reference, tmp_path / "r")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dataclasses import dataclass\n"
         "from mbrl.runs import Run\n@dataclass\nclass C:\n    x: int = 0\n"
         f"Run({str(run)!r}, C(), tensorboard=False)\nprint('locked', flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (run / "run.lock").read_text().strip() == str(holder.pid)
        assert cli.main(["resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"run {run} is being written by process {holder.pid}" in err
        argv = ["run", *TINY, "--runs-dir", str(tmp_path), "--name", "r", "--overwrite"]
        assert cli.main(argv) == 2
        assert f"is being written by process {holder.pid}" in capsys.readouterr().err
        assert (run / "checkpoint-3.pt").exists()  # --overwrite left it alone
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["resume", str(run)]) == 0  # the kernel dropped the dead holder's lock


def test_a_new_run_folder_is_made_by_one_run_only(tmp_path):
    meta = {"algo": "pets"}
    first = Run(tmp_path / "x", _Cfg(), meta, create="new", tensorboard=False)
    with pytest.raises(RunFolderError, match="already exists but holds no checkpoint yet"):
        Run(tmp_path / "x", _Cfg(), meta, create="new", tensorboard=False)
    first.save_checkpoint({"w": torch.ones(2)})
    with pytest.raises(RunFolderError, match="already exists and holds a checkpoint; contin"):
        Run(tmp_path / "x", _Cfg(), meta, create="new", tensorboard=False)
    with pytest.raises(RunFolderError, match=r"being written by this process \(\d+\)"):
        Run(tmp_path / "x", _Cfg(), meta, create="overwrite", tensorboard=False)
    first.close()
    # a folder whose making was stopped before run.yaml was never started: a new run takes it
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "run.lock").write_text("12345\n")  # of a process killed meanwhile
    (tmp_path / "y" / "config.yaml").write_text("steps: 99\n")
    Run(tmp_path / "y", _Cfg(), meta, create="new", tensorboard=False).close()
    assert yaml.safe_load((tmp_path / "y" / "config.yaml").read_text()) == {"steps": 3}


# ----- 3. refused values leave no folder; --overwrite ------------------------------------------


def test_a_value_refused_while_building_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    argv = ["run", *TINY, "--runs-dir", str(tmp_path), "--name", "b"]

    def refuse(cfg):
        raise ValueError(f"planner.population={cfg.population} is refused by the planner")

    monkeypatch.setattr(pets, "make_planner", refuse)
    assert cli.main(argv) == 2
    assert "planner.population=20 is refused" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert cli.main([*argv, "planner.iterations=0"]) == 2  # refused by the config: no folder
    assert not (tmp_path / "b").exists()
    monkeypatch.undo()
    assert cli.main(argv) == 0  # the corrected command runs under the same name


def test_a_folder_without_a_checkpoint_says_how_to_start_over(tmp_path, monkeypatch, capsys):
    argv = ["run", *TINY, "--runs-dir", str(tmp_path), "--name", "n"]
    original = mpc_loop.run_episode

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mpc_loop, "run_episode", interrupted)
    assert cli.main(argv) == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err
    monkeypatch.setattr(mpc_loop, "run_episode", original)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists but holds no checkpoint yet; start it over with --overwrite" in err
    monkeypatch.setattr(pets, "make_planner", lambda cfg: (_ for _ in ()).throw(ValueError("x")))
    assert cli.main(["resume", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint yet, so nothing is lost by starting over" in err
    assert "`mbrl run` command with --overwrite" in err
    monkeypatch.undo()
    assert cli.main([*argv, "--overwrite"]) == 0
    assert [r["trial"] for r in _rows(tmp_path / "n")][-2:] == ["1", "2"]


# ----- 4. Ctrl-C -------------------------------------------------------------------------------


def test_ctrl_c_exits_130_naming_the_latest_checkpoint(reference, tmp_path, monkeypatch, capsys):
    original, calls = mpc_loop.run_episode, []

    def second_trial_interrupted(env, policy, *args, **kwargs):
        calls.append(type(policy).__name__)
        if calls.count("MPCController") == 2:
            raise KeyboardInterrupt
        return original(env, policy, *args, **kwargs)

    monkeypatch.setattr(mpc_loop, "run_episode", second_trial_interrupted)
    run = tmp_path / "c"
    assert cli.main(["run", *TINY, "--runs-dir", str(tmp_path), "--name", "c"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("mbrl: interrupted; the latest checkpoint is ")
    assert f"{run / 'checkpoint-2.pt'} (after row" in err and ": trial=1)" in err
    assert f"continue with `mbrl resume {run}`" in err and "Traceback" not in err
    monkeypatch.undo()
    assert cli.main(["resume", str(run)]) == 0
    assert _rows(run) == _rows(reference)


def test_first_ctrl_c_stops_at_the_next_checkpoint(reference, tmp_path, monkeypatch, capsys):
    """SIGINT during trial 1: the trial ends and is saved, then the run stops (130)."""
    original, calls = mpc_loop.run_episode, []

    def ctrl_c_in_first_trial(env, policy, *args, **kwargs):
        calls.append(type(policy).__name__)
        if calls.count("MPCController") == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(env, policy, *args, **kwargs)

    monkeypatch.setattr(mpc_loop, "run_episode", ctrl_c_in_first_trial)
    # as in a terminal (a shell's background job starts with SIGINT ignored, and so stays)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    run = tmp_path / "s"
    try:
        assert cli.main(["run", *TINY, "--runs-dir", str(tmp_path), "--name", "s"]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert "Ctrl-C: the run stops at its next checkpoint" in err
    assert f"mbrl: stopped; the latest checkpoint is {run / 'checkpoint-2.pt'}" in err
    assert [r["trial"] for r in _rows(run)][-1] == "1"  # the trial in progress was kept
    monkeypatch.undo()
    assert cli.main(["resume", str(run)]) == 0
    assert _rows(run) == _rows(reference)


# ----- 5. a full disk --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["torch.save", "fsync"])
def test_a_full_disk_removes_the_temporary_and_says_so(
    reference, tmp_path, monkeypatch, capsys, where
):
    """The second checkpoint's write fails with ENOSPC: no .tmp file stays, the message names
    the file, and the first checkpoint is still the latest, from which the run resumes."""
    saves = []
    if where == "torch.save":
        original = torch.save

        def save(obj, f, *args, **kwargs):
            saves.append(1)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(obj, f, *args, **kwargs)

        monkeypatch.setattr(runs.torch, "save", save)
    else:
        real_fsync = os.fsync

        def fsync(fd):  # after the bytes of checkpoint-2.pt.tmp were written
            if stat.S_ISREG(os.fstat(fd).st_mode):
                saves.append(1)
                if len(saves) == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        monkeypatch.setattr(runs.os, "fsync", fsync)
    run = tmp_path / "f"
    assert cli.main(["run", *TINY, "--runs-dir", str(tmp_path), "--name", "f"]) == 2
    err = capsys.readouterr().err
    assert f"no space left on device while writing {run / 'checkpoint-2.pt'}; free some" in err
    assert f"`mbrl resume {run}`" in err and "Traceback" not in err
    assert not list(run.glob("*.tmp"))
    assert load_checkpoint_file(run / "checkpoint.pt")["sequence"] == 1
    monkeypatch.undo()
    assert cli.main(["resume", str(run)]) == 0
    assert _rows(run) == _rows(reference)


def test_temporaries_left_by_a_kill_are_ignored_and_removed(reference, tmp_path):
    run = _copy(reference, tmp_path / "r")
    for name in ("checkpoint-4.pt.tmp", "checkpoint.pt.tmp", "metrics.csv.tmp"):
        (run / name).write_bytes(b"half a write")
    assert cli.main(["resume", str(run)]) == 0
    assert not list(run.glob("*.tmp"))


# ----- 6. one line that names the file or field -----------------------------------------------


@pytest.mark.parametrize("missing", ["config.yaml", "run.yaml"])
def test_resume_without_config_or_run_yaml(reference, tmp_path, capsys, missing):
    run = _copy(reference, tmp_path / "r")
    (run / missing).unlink()
    assert cli.main(["resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / missing} is missing; resuming needs it" in err
    assert "--overwrite" in err and err.count("\n") == 1


def test_a_read_only_runs_folder_is_named(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anyway: let the file system refuse instead
        real_mkdir = os.mkdir

        def read_only(path, *args, **kwargs):
            if str(path).startswith(str(ro)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", read_only)
    assert cli.main(["run", *TINY, "--runs-dir", str(ro), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {ro / 'x'} (" in err and "pick a writable --runs-dir" in err
    assert "Traceback" not in err and not (ro / "x").exists()


@pytest.mark.parametrize("name", ["../out", "/tmp/abs", "a/b", "..", "a\\b", "."])
def test_a_name_that_leaves_the_runs_folder_is_refused(tmp_path, capsys, name):
    runs_dir = tmp_path / "runs"
    assert cli.main(["run", *TINY, "--runs-dir", str(runs_dir), "--name", name]) == 2
    err = capsys.readouterr().err
    assert f"--name {name!r} must be one folder name inside --runs-dir" in err
    assert not runs_dir.exists() and not (tmp_path / "out").exists()


# ----- 7. checkpoint size and the buffer format ---------------------------------------------


def test_a_buffer_checkpoint_holds_its_rows_not_its_capacity(tmp_path):
    buf = ReplayBuffer(5, 1, capacity=1_000_000)
    g = torch.Generator().manual_seed(0)
    buf.add_batch(*(torch.randn(100, d, generator=g) for d in (5, 1)), torch.zeros(100),
                  torch.randn(100, 5, generator=g), torch.zeros(100))  # fmt: skip
    out = io.BytesIO()
    torch.save(buf.state_dict(), out)
    assert len(out.getvalue()) < 50_000  # the preallocated ring is 1e6 rows, about 60 MB
    # format 2 wrote slices of the ring (each with the whole ring's storage); still read exactly
    small = ReplayBuffer(5, 1, capacity=1000)
    old = {**buf.state_dict(), "capacity": 1000}
    small.load_state_dict(old)
    for key in ("obs", "act", "reward", "terminated", "truncated", "last", "episode", "step"):
        old[key] = getattr(small, key)[: len(small)]  # views of the preallocated ring
    old["version"] = 2
    out = io.BytesIO()
    torch.save(old, out)
    out.seek(0)
    again = ReplayBuffer(5, 1, capacity=1000)
    again.load_state_dict(torch.load(out, weights_only=True))
    for x, y in zip(vars(again.all()).values(), vars(buf.all()).values(), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="format 9, this version reads format 2 or 3"):
        again.load_state_dict({**old, "version": 9})


def test_metrics_report_the_previous_checkpoints_size_and_write_time(reference):
    rows = list(csv.DictReader((reference / "metrics.csv").open()))
    assert rows[0]["checkpoint_mb"] == "" and rows[0]["checkpoint_seconds"] == ""
    before_last = (reference / "checkpoint-2.pt").stat().st_size / 1e6
    assert float(rows[-1]["checkpoint_mb"]) == pytest.approx(before_last, rel=1e-5)
    assert float(rows[-1]["checkpoint_seconds"]) > 0


def test_a_format_1_checkpoint_is_read_unverified_with_a_warning(tmp_path):
    run = Run(tmp_path / "r", _Cfg(), tensorboard=False)
    payload = {"format": 1, "config_hash": run.hash, "metrics_rows": 0, "state": {"n": 1}}
    torch.save(payload, run.checkpoint_path)
    with pytest.warns(UserWarning, match="format 1, from before checkpoints carried content"):
        assert run.load_checkpoint() == {"n": 1}
    run.close()


def test_a_run_started_ignoring_sigint_keeps_ignoring_it(tmp_path, monkeypatch):
    """A background job (``nohup``, ``&``) starts with SIGINT ignored: training leaves it so."""
    original, seen = mpc_loop.run_episode, []

    def record_handler(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        return original(*args, **kwargs)

    monkeypatch.setattr(mpc_loop, "run_episode", record_handler)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert cli.main(["run", *TINY, "--runs-dir", str(tmp_path), "--name", "i"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen and all(h is signal.SIG_IGN for h in seen)
