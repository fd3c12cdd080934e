"""Running a sweep's runs on a local pool of processes or as Ray tasks.

Every attempt of a run is an ordinary command in a process of its own: ``mbrl run`` the first
time, ``mbrl resume`` of its folder once the folder was started (after a crash, a kill or a
stop), so each attempt continues from the run's own last checkpoint, exactly as a resume by
hand. A process per attempt keeps runs apart: a fresh interpreter per run, as ``mbrl run``
alone has (no torch thread setting, generator or cached state shared between runs), the same
numbers whichever backend or worker runs it; a killed run ends only its own process, whose
exit the sweep sees, and the kernel frees the run's ``run.lock`` for the resume.

The worker of both backends is :func:`attempt`: in a thread of this process for the ``local``
backend (the pool's size, ``CPUs // cpus_per_run``, bounds the runs at once), or as a Ray task
with ``num_cpus=cpus_per_run`` for ``ray``. Each run's process has ``cpus_per_run`` torch
threads (``torch.set_num_threads``, and ``OMP_NUM_THREADS`` for the libraries it loads). On a
Ray cluster, every node needs ``mbrl`` installed and the sweep folder on a shared file system.
A run's process ends with the worker that started it (:mod:`mbrl.sweep.child`), so a killed
sweep leaves no run behind: ``mbrl sweep --resume`` continues each from its last checkpoint.

A Ctrl-C of the sweep writes ``stop`` into the sweep folder: every run stops at its next
checkpoint (the first Ctrl-C of ``mbrl run``), no run starts, and ``mbrl sweep --resume``
continues. A second Ctrl-C writes ``stop-now``: the runs stop at once, losing the work since
their last checkpoint (which stays intact). Each attempt's output goes to
``logs/<run>.log`` in the sweep folder.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from mbrl.sweep.manifest import Manifest, RunRecord, SweepFolderError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

LOCK = "sweep.lock"
STOP = "stop"
STOP_NOW = "stop-now"
LOGS = "logs"
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class Attempt:
    """How one attempt of a run ended.

    Fields:
        name: the run.
        returncode: the exit status of its process (negative: killed by that signal); None
            when it never started because the sweep was stopping.
        seconds: its wall time.
        last_line: the last line of its output (why a failed attempt failed).
    """

    name: str
    returncode: int | None
    seconds: float
    last_line: str


def attempt(name: str, argv: list[str], threads: int, folder: str) -> Attempt:
    """Run ``mbrl ARGV`` (``run ...`` or ``resume ...``) for the run ``name`` of the sweep in
    ``folder`` in a process of its own with ``threads`` torch threads, its output appended to
    ``folder/logs/<name>.log``; wait for it, passing on a stop (``folder/stop``: one SIGINT,
    ``folder/stop-now``: a second one). Runs in a thread (local) or a Ray task (ray)."""
    root = Path(folder)
    if (root / STOP).exists():
        return Attempt(name, None, 0.0, "")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "mbrl.sweep.child", str(threads), str(os.getpid()), *argv]
    log = root / LOGS / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("ab") as out:
        head = f"== mbrl {shlex.join(argv)}  (host {socket.gethostname()}, {threads} threads)\n"
        out.write(head.encode())
        out.flush()
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the sweep, which passes it on
        )
    sent = 0
    try:
        while True:
            try:
                code = child.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            want = 2 if (root / STOP_NOW).exists() else 1 if (root / STOP).exists() else 0
            for _ in range(sent, want):
                child.send_signal(signal.SIGINT)
            sent = max(sent, want)
    except BaseException:  # this worker is going away: stop the run at its next checkpoint
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
        raise
    return Attempt(name, code, time.perf_counter() - t0, _last_line(log))


class Pool(Protocol):
    """Where attempts run: :class:`LocalPool` or :class:`RayPool`."""

    slots: int  # runs at once
    startup_seconds: float  # the time the pool took to start (Ray's start-up)

    def submit(self, name: str, argv: list[str], threads: int, folder: str) -> Future: ...

    def close(self) -> None: ...


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class LocalPool:
    """Up to ``available_cpus() // cpus_per_run`` runs at once on this machine.

    Raises:
        ValueError: ``cpus_per_run`` exceeds the CPUs of this machine.
    """

    def __init__(self, cpus_per_run: int) -> None:
        cpus = available_cpus()
        if cpus_per_run > cpus:
            raise ValueError(
                f"--cpus-per-run {cpus_per_run} exceeds the {cpus} CPUs of this machine; use "
                f"--cpus-per-run {cpus} or fewer (or --backend ray on a cluster)"
            )
        self.slots = cpus // cpus_per_run
        self.startup_seconds = 0.0
        self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix="mbrl-sweep")

    def submit(self, name: str, argv: list[str], threads: int, folder: str) -> Future:
        return self._executor.submit(attempt, name, argv, threads, folder)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class RayPool:
    """Attempts as Ray tasks of ``num_cpus=cpus_per_run`` each: on the cluster at ``address``
    (``ray.init(address=...)``), or on a Ray instance started on this machine with its CPUs
    (stopped again by :meth:`close`); a Ray already initialised in this process is used as it
    is. Ray does not retry a task (``max_retries=0``): the sweep resumes a crashed run itself.

    Raises:
        MissingExtraError: ray is not installed (the message says how to install it).
        ValueError: ``cpus_per_run`` exceeds the CPUs of the cluster.
    """

    def __init__(self, cpus_per_run: int, address: str | None = None) -> None:
        from mbrl.extras import require

        ray = require("ray", "mbrl sweep --backend ray")
        self._ray = ray
        t0 = time.perf_counter()
        self._owns = not ray.is_initialized()
        if self._owns:
            extra = {} if address is not None else {"num_cpus": available_cpus()}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **extra)
        self.startup_seconds = time.perf_counter() - t0
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            if cpus_per_run > cpus:
                raise ValueError(
                    f"--cpus-per-run {cpus_per_run} exceeds the {cpus} CPUs of the Ray cluster; "
                    f"use --cpus-per-run {max(cpus, 1)} or fewer"
                )
        except BaseException:
            self.close()
            raise
        self.slots = cpus // cpus_per_run
        self._remote = ray.remote(attempt).options(num_cpus=cpus_per_run, max_retries=0)

    def submit(self, name: str, argv: list[str], threads: int, folder: str) -> Future:
        return self._remote.remote(name, argv, threads, folder).future()

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


@dataclass(frozen=True)
class SweepResult:
    """How ``run_sweep`` ended.

    Fields:
        manifest: the manifest as last written.
        stopped: a Ctrl-C stopped it (the unfinished runs are pending).
        seconds: its wall time, the pool's start-up not included.
    """

    manifest: Manifest
    stopped: bool
    seconds: float


def run_sweep(
    folder: Path, manifest: Manifest, pool: Pool, view: Callable[[Manifest], None] | None = None
) -> SweepResult:
    """Run every run of ``manifest`` that is not done on ``pool``, writing the manifest into
    ``folder`` at every change and showing it with ``view``.

    A run whose attempt fails (a non-zero exit, a kill, a lost Ray worker) is tried again with
    ``mbrl resume`` up to ``manifest.retries`` times, then marked failed; the other runs go on.
    Runs an earlier sweep left running or failed are pending again, with fresh retries.
    A Ctrl-C (SIGINT) stops the sweep as the module docstring says. One process runs a sweep
    folder at a time (it holds ``sweep.lock``).

    Raises:
        SweepFolderError: another process runs the sweep.
    """
    folder = Path(folder).resolve()
    with holding(folder):
        return _run(folder, manifest, pool, view)


def _run(
    folder: Path, manifest: Manifest, pool: Pool, view: Callable[[Manifest], None] | None
) -> SweepResult:
    (folder / LOGS).mkdir(exist_ok=True)
    _clear_stop(folder)
    t0 = time.perf_counter()
    records = {r.spec.name: r for r in manifest.runs}
    for name, r in records.items():
        if r.state != "done":
            records[name] = dataclasses.replace(r, state="pending")
    left = {name: manifest.retries + 1 for name, r in records.items() if r.state != "done"}
    futures: dict[Future, str] = {}
    marks: dict[str, int] = {}  # the size of a run's log when its attempt was submitted
    started: set[str] = set()  # runs whose current attempt has begun
    seen: dict[str, float] = {}  # metrics.csv modification times read
    current = manifest

    def submit(name: str) -> None:
        spec, path = records[name].spec, folder / name
        if (path / "run.yaml").exists():  # started before: continue from its checkpoint
            argv = ["resume", str(path)]
        else:
            argv = [*spec.argv[:2], "--runs-dir", str(folder), "--name", name, *spec.argv[2:]]
        log = folder / LOGS / f"{name}.log"
        marks[name] = log.stat().st_size if log.exists() else -1
        left[name] -= 1
        futures[pool.submit(name, argv, manifest.cpus_per_run, str(folder))] = name

    def begin(name: str) -> None:
        started.add(name)
        r = records[name]
        records[name] = dataclasses.replace(r, state="running", attempts=r.attempts + 1)

    def save() -> None:
        nonlocal current
        current = dataclasses.replace(
            manifest, runs=tuple(records[r.spec.name] for r in manifest.runs)
        )
        current.save(folder)
        if view is not None:
            view(current)

    stops = 0
    with _ctrl_c() as ctrl_c, _stop_on_error(folder):
        for name in left:
            submit(name)
        save()
        while futures:
            finished, _ = wait(list(futures), timeout=0.5, return_when=FIRST_COMPLETED)
            changed = False
            if ctrl_c[0] > stops:
                stops = ctrl_c[0]
                (folder / (STOP if stops == 1 else STOP_NOW)).touch()
                _say_stopping(stops)
            for future in finished:
                name = futures.pop(future)
                result, why = _outcome(future)
                if result is not None and result.returncode is None:  # never started
                    left[name] += 1
                    continue
                if name not in started:
                    begin(name)
                started.discard(name)
                r = dataclasses.replace(records[name], last_return=_last_return(folder / name))
                if result is not None and result.returncode == 0:
                    records[name] = dataclasses.replace(r, state="done", error=None)
                elif stops and result is not None and result.returncode in (130, -signal.SIGINT):
                    records[name] = dataclasses.replace(r, state="pending")
                elif left[name] > 0 and not stops:
                    records[name] = dataclasses.replace(r, state="pending", error=why)
                    submit(name)
                else:
                    state = "failed" if left[name] == 0 else "pending"
                    records[name] = dataclasses.replace(r, state=state, error=why)
                changed = True
            for name in set(futures.values()):
                log = folder / LOGS / f"{name}.log"
                if name not in started and log.exists() and log.stat().st_size > marks[name]:
                    begin(name)
                    changed = True
                if name in started and _metrics_changed(folder / name, seen):
                    ret = _last_return(folder / name)
                    if ret != records[name].last_return:
                        records[name] = dataclasses.replace(records[name], last_return=ret)
                        changed = True
            if changed:
                save()
    _clear_stop(folder)
    return SweepResult(current, stopped=stops > 0, seconds=time.perf_counter() - t0)


@contextmanager
def holding(folder: Path) -> Iterator[None]:
    """Hold the sweep folder's ``sweep.lock`` (an exclusive ``flock`` with this process's PID
    in it) for as long as the block runs; a killed process drops it.

    Raises:
        SweepFolderError: another process holds it.
    """
    if fcntl is None:
        yield
        return
    file = open(folder / LOCK, "a+")  # noqa: SIM115  (held open while the sweep runs)
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.seek(0)
        pid = file.read().strip() or "unknown"
        file.close()
        raise SweepFolderError(
            f"sweep {folder} is being run by process {pid}; wait for it to end (or stop it: "
            f"kill -INT {pid}), then `mbrl sweep --resume {folder}`"
        ) from None
    try:
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield
    finally:
        file.close()


@contextmanager
def _stop_on_error(folder: Path) -> Iterator[None]:
    """Should the sweep itself fail, stop its runs at their next checkpoint (``stop``)."""
    try:
        yield
    except BaseException:
        (folder / STOP).touch()
        raise


def _outcome(future: Future) -> tuple[Attempt | None, str | None]:
    """The attempt a future holds, and why it failed (None when it did not)."""
    try:
        result: Attempt = future.result()
    except Exception as e:  # the worker itself was lost (a Ray node, say)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return None, f"its worker was lost ({type(e).__name__}: {first})"
    code = result.returncode
    if code == 0 or code is None:
        return result, None
    if code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = str(-code)
        return result, f"killed by signal {sig}"
    return result, f"exit status {code}: {result.last_line}"


def _last_return(run_path: Path) -> float | None:
    """The last finite ``return`` of a run's ``metrics.csv``, or None."""
    from mbrl.plots import read_run

    metrics = run_path / "metrics.csv"
    try:
        curve = read_run(metrics, "env_steps", "return")
    except (OSError, ValueError, StopIteration):
        return None
    return float(curve.y[-1]) if curve.y.size else None


def _metrics_changed(run_path: Path, seen: dict[str, float]) -> bool:
    try:
        mtime = (run_path / "metrics.csv").stat().st_mtime
    except OSError:
        return False
    key = str(run_path)
    if seen.get(key) == mtime:
        return False
    seen[key] = mtime
    return True


def _last_line(log: Path) -> str:
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")


def _clear_stop(folder: Path) -> None:
    for name in (STOP, STOP_NOW):
        (folder / name).unlink(missing_ok=True)


def _say_stopping(count: int) -> None:
    if count == 1:
        text = (
            "mbrl sweep: Ctrl-C: every run stops at its next checkpoint and no run starts; "
            "press Ctrl-C again to stop the runs now, losing their work since that checkpoint"
        )
    else:
        text = "mbrl sweep: Ctrl-C again: the runs stop now"
    print(f"\n{text}", file=sys.stderr, flush=True)


@contextmanager
def _ctrl_c() -> Iterator[list[int]]:
    """While the sweep runs: count SIGINTs (``[n]``) instead of raising KeyboardInterrupt, so
    that the loop passes them on to the runs and keeps waiting for them."""
    count = [0]
    if threading.current_thread() is not threading.main_thread():
        yield count  # signal handlers belong to the main thread
        return

    def handler(signum, frame) -> None:
        count[0] += 1

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield count
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


class LiveView:
    """A sweep's progress on ``stream`` (default stderr), called with each manifest written:
    on a terminal, a compact table (counts, then the runs not pending) redrawn in place; elsewhere
    one plain line per run that changed, after the counts."""

    def __init__(self, stream: TextIO | None = None, table: bool | None = None) -> None:
        self.stream = stream
        self.table = table
        self._last: dict[str, tuple] = {}
        self._drawn = 0

    def __call__(self, manifest: Manifest) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        table = self.table if self.table is not None else stream.isatty()
        c = manifest.counts()
        counts = (
            f"sweep {manifest.name}: {c['done']}/{len(manifest.runs)} done, {c['running']} "
            f"running, {c['failed']} failed, {c['pending']} pending"
        )
        if table:
            lines = [counts, *(_row(r) for r in manifest.runs if r.state != "pending" or r.error)]
            up = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            stream.write(up + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            for r in manifest.runs:
                key = (r.state, r.attempts, r.last_return, r.error)
                if self._last.get(r.spec.name, ("pending", 0, None, None)) != key:
                    stream.write(f"{counts} | {_row(r)}\n")
                self._last[r.spec.name] = key
        stream.flush()


def _row(r: RunRecord) -> str:
    ret = "" if r.last_return is None else f", return {r.last_return:.4g}"
    why = f" ({r.error})" if r.error and r.state != "done" else ""
    return f"{r.spec.name}: {r.state}, attempt {r.attempts}{ret}{why}"
