"""A run folder: resolved config, ``metrics.csv``, checkpoints and plots.

Layout of ``runs/<name>/``::

    config.yaml         the resolved config (what ``mbrl resume`` reads back)
    run.yaml            algorithm, device and checkpoint settings of the run
    metrics.csv         one row per logged step (episodes for PETS)
    tensorboard/        the same numbers as TensorBoard scalars (``tensorboard --logdir runs``)
    checkpoint-<n>.pt   the last ``keep_checkpoints`` checkpoints (default 2), n counting up,
                        and every ``keep_every``-th one when that is set
    checkpoint.pt       the latest checkpoint: a second name (hard link) of the newest
                        checkpoint-<n>.pt, a copy where the file system has no hard links
    checkpoint-best.pt  with ``keep_best``: the checkpoint written after the best row so far
    best.yaml           which checkpoint that is, and its row and value
    config.<n>.yaml     the configs a continued run ran under before (``extend_budget``), n
                        counting up; config.yaml is always the current one
    run.lock            locked by the process writing the run, with its PID in it
    learning_curve.png

One process writes a run folder at a time: :class:`Run` takes an exclusive ``flock`` on
``run.lock`` for as long as it is open (until :meth:`Run.close`, or the end of the process; a
killed process drops it), so a second ``mbrl run`` or ``mbrl resume`` of a run in progress is
refused with the PID of the process writing it. A new run folder is made with one ``mkdir``
that fails when the folder exists, so two runs started together under one name cannot share it.
``run.yaml`` is written last: a folder without it, metric rows or checkpoints was never started
(its making was interrupted), and a new run of that name takes it over. (Where ``fcntl`` does
not exist, on Windows, there is no lock.)

Checkpoints are written to a temporary file, flushed to disk and renamed, so a run killed at
any moment leaves the previous checkpoint intact; a failed write (a full disk, say) removes its
temporary file. They hold only tensors, numbers, strings, lists and dicts and are read with
``torch.load(weights_only=True)``: nothing in them is ever executed. Each carries the sha256 of
every tensor in it and of the rest of its content (counters, RNG states, the config digest);
a checkpoint whose content no longer matches (a flipped bit, a truncated or empty file) is
refused, naming the last good checkpoint kept, from which ``mbrl resume runs/<name> --from
checkpoint-<n>.pt`` continues. What a training loop saves is one typed record,
:class:`mbrl.algorithms.loop.Checkpoint`. A resumed run drops the metric rows logged after its
checkpoint, in ``metrics.csv`` and in TensorBoard (whose events from that step on are purged),
and the checkpoints numbered after it.

A best checkpoint (``keep_best="return"``, ``mbrl run --keep-best``) is judged by the metric
column's value in the last row logged before each checkpoint (the trial's return for PETS and
GP-MPC, the evaluation return for the Dyna and model-free runs, whose checkpoint holds the
agent that scored it); a checkpoint whose value beats every earlier one (strictly, finite
values only) also becomes ``checkpoint-best.pt``. Every checkpoint records the best so far, so
a resumed run goes on judging against it; a best checkpoint written after the checkpoint a run
resumes from is dropped with the rows after it (the resumed run writes it again when it gets
there).

A finished run is continued with a larger budget (``extend_budget``, ``mbrl run --continue``):
the config may change in the given keys only (``trials``, ``total_steps``), the old
``config.yaml`` is kept as ``config.<n>.yaml``, and the checkpoints written under any of the
folder's configs are accepted.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import numbers
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from mbrl.config import ConfigError, save_config, to_dict

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

CHECKPOINT_FORMAT = 2
"""Version of the checkpoint payload; 2 adds the content digests and the sequence number
(format 1, without them, is still read, unverified)."""

LATEST = "checkpoint.pt"
BEST = "checkpoint-best.pt"
BEST_RECORD = "best.yaml"
LOCK = "run.lock"
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pt")
_EARLIER_CONFIG = re.compile(r"config\.(\d+)\.yaml")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, truncated, or from another config."""


class RunFolderError(RuntimeError):
    """A run folder that cannot be made or written: it exists already, another process
    writes it, the disk is full, or the file system refuses the write."""


def _dict_hash(d: dict) -> str:
    """A stable digest of a config's plain-dict form."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _is_subset(part: Any, whole: Any) -> bool:
    """``part`` equals ``whole`` except for keys ``whole``'s dicts have in addition."""
    if isinstance(part, dict) and isinstance(whole, dict):
        return all(k in whole and _is_subset(v, whole[k]) for k, v in part.items())
    return part == whole


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys of ``old`` whose values differ in ``new`` (keys ``new`` has in addition,
    fields added since with their defaults, do not count)."""
    out = []
    for k, v in old.items():
        w = new.get(k)
        if isinstance(v, dict) and isinstance(w, dict):
            out += _changed(v, w, f"{prefix}{k}.")
        elif k not in new or v != w:
            out.append(f"{prefix}{k}")
    return out


def _dotted(d: dict, key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _overlay(whole: dict, part: dict) -> dict:
    """``whole`` with the values ``part`` has (a config as saved, read with today's fields)."""
    out = dict(whole)
    for k, v in part.items():
        w = whole.get(k)
        out[k] = _overlay(w, v) if isinstance(v, dict) and isinstance(w, dict) else v
    return out


class Run:
    """The folder of one run, held by this process until :meth:`close`.

    Args:
        path: ``runs/<name>``.
        cfg: the resolved config dataclass (saved as ``config.yaml`` on creation).
        meta: algorithm, device, ...: what the CLI needs to resume the run (``run.yaml``,
            written on creation).
        tensorboard: also write every numeric metric as a TensorBoard scalar under
            ``path/tensorboard``, at the row's ``env_steps`` (the row index when it has none).
        keep_checkpoints: K, how many of the newest checkpoints to keep (>= 1).
        keep_every: also keep every checkpoint whose number is a multiple of this (0: none).
        create: ``"open"`` makes the folder if missing and continues one that exists;
            ``"new"`` makes it and refuses one that exists, unless that one was never started
            (:func:`never_started`), which it empties; ``"overwrite"`` empties one that
            exists (once it holds the lock) or makes it. Only ``"open"`` shares the lock with
            another :class:`Run` of the folder in this process.
        resume_from: the file name of a kept checkpoint (``checkpoint-<n>.pt``) that
            :meth:`load_checkpoint` reads instead of the latest; the checkpoints numbered after
            it are dropped when it is read.
        keep_best: a metric column (``"return"``) by which ``checkpoint-best.pt`` is kept
            (see the module docstring); ``None``: no best checkpoint.
        extend_budget: continue the folder's run under ``cfg``, which may differ from its
            ``config.yaml`` in these top-level keys only (``("trials",)``); when it differs, the
            old ``config.yaml`` is kept as ``config.<n>.yaml`` and ``cfg`` written in its place.
            ``None``: ``cfg`` is the folder's config.

    Raises:
        RunFolderError: the folder exists (``create="new"``), another process writes it, or
            it cannot be made or written.
        CheckpointError: ``resume_from`` is not a checkpoint of this folder.
        ConfigError: ``cfg`` differs from the folder's config in a key not in
            ``extend_budget``.
    """

    def __init__(
        self,
        path: str | Path,
        cfg: Any,
        meta: dict[str, Any] | None = None,
        tensorboard: bool = True,
        keep_checkpoints: int = 2,
        keep_every: int = 0,
        create: Literal["open", "new", "overwrite"] = "open",
        resume_from: str | None = None,
        keep_best: str | None = None,
        extend_budget: Sequence[str] | None = None,
    ) -> None:
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int):
            raise ValueError(f"keep_checkpoints must be an int >= 1, got {keep_checkpoints!r}")
        if keep_checkpoints < 1 or keep_every < 0:
            raise ValueError(
                f"keep_checkpoints must be >= 1 and keep_every >= 0, got {keep_checkpoints} "
                f"and {keep_every}"
            )
        self.path = Path(path)
        if extend_budget is not None and create != "open":
            raise ValueError(f"extend_budget continues a run: use create='open', not {create!r}")
        self.keep_checkpoints, self.keep_every = keep_checkpoints, keep_every
        self.keep_best = keep_best
        self.tensorboard_path = self.path / "tensorboard" if tensorboard else None
        self._writer = None  # opened at the first log: importing tensorboard takes a second
        self._purge_step: int | None = None
        self.stop_requested = False
        create = self._make_folder(create)
        self._lock: _FolderLock | None = _FolderLock.acquire(self.path, shared=create == "open")
        try:
            self._open(cfg, meta, create, resume_from, extend_budget)
        except BaseException:
            self.close()
            raise

    def _make_folder(self, create: str) -> str:
        """Make the folder as ``create`` says; returns how to open it (a new run takes over a
        folder that was never started, as ``"overwrite"``)."""
        with _writing(self.path, self.path, making=True):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if create == "new":
                try:
                    os.mkdir(self.path)
                except FileExistsError:
                    if not never_started(self.path):
                        raise RunFolderError(_exists_message(self.path)) from None
                    create = "overwrite"
            else:
                self.path.mkdir(exist_ok=True)
        if not self.path.is_dir():
            raise RunFolderError(f"run folder {self.path} is a file, not a folder; pick another")
        return create

    def _open(
        self,
        cfg: Any,
        meta: dict | None,
        create: str,
        resume_from: str | None,
        extend_budget: Sequence[str] | None,
    ) -> None:
        for entry in self.path.iterdir():
            if create == "overwrite" and entry.name != LOCK and entry.is_dir():
                shutil.rmtree(entry)
            elif create == "overwrite" and entry.name != LOCK:
                entry.unlink()
            elif entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink()  # left by a write that was killed; this process holds the lock
        self.cfg = cfg
        full = to_dict(cfg)
        self.hash = _dict_hash(full)
        self.metrics_path = self.path / "metrics.csv"
        self.checkpoint_path = self.path / LATEST
        config_path = self.path / "config.yaml"
        if not config_path.exists():
            with _writing(config_path, self.path):
                _replace_with(config_path, lambda tmp: save_config(cfg, tmp))
        stored = yaml.safe_load(config_path.read_text()) or {}
        if extend_budget is not None:
            stored = self._extend(config_path, stored, cfg, tuple(extend_budget))
        # Digests a checkpoint of this config may carry: the current one, that of the config
        # as this run first saved it when a field was added (with a default) since, and those
        # of the configs the run ran under before it was continued (as saved, and as read now).
        self._accepted_hashes = {self.hash}
        if _is_subset(stored, full):
            self._accepted_hashes.add(_dict_hash(stored))
        for _, earlier in self.earlier_configs():
            old = yaml.safe_load(earlier.read_text()) or {}
            self._accepted_hashes |= {_dict_hash(old), _dict_hash(_overlay(full, old))}
        if meta is not None and not (self.path / "run.yaml").exists():
            text = yaml.safe_dump(meta, sort_keys=False)
            with _writing(self.path / "run.yaml", self.path):
                _replace_with(self.path / "run.yaml", lambda tmp: tmp.write_text(text))
        self._rows = self._count_rows()
        self._columns: list[str] | None = self._read_columns()
        numbers_kept = [n for n, _ in self.kept_checkpoints()]
        self._sequence = max(numbers_kept, default=0)  # the number of the newest checkpoint
        self._latest: Path | None = None  # the checkpoint saved or read last, and its rows
        self._latest_rows = 0
        self._checkpoint_mb: float | str = ""
        self._checkpoint_seconds: float | str = ""
        self._resume_from: Path | None = None
        self._best: dict[str, Any] | None = None  # {"sequence", "value", "row"} of the best
        self._candidate: tuple[float, int] | None = None  # (value, row) logged since a save
        if resume_from is not None:
            names = [p.name for _, p in self.kept_checkpoints()]
            if resume_from not in names:
                raise CheckpointError(
                    f"--from {resume_from!r}: {self.path} keeps no such checkpoint; kept: "
                    f"{', '.join(names) or 'none'}"
                )
            self._resume_from = self.path / resume_from

    def _extend(self, config_path: Path, stored: dict, cfg: Any, keys: tuple[str, ...]) -> dict:
        """Check that ``cfg`` differs from ``stored`` (``config.yaml``) in ``keys`` only; when
        it differs, keep ``config.yaml`` as the next ``config.<n>.yaml`` and write ``cfg``.
        Returns the folder's config now."""
        full = to_dict(cfg)
        changed = _changed(stored, full)
        refused = [k for k in changed if k.split(".")[0] not in keys]
        if refused:
            key = refused[0]
            raise ConfigError(
                f"{key}={_dotted(full, key)!r} differs from {key}={_dotted(stored, key)!r} in "
                f"{config_path}: continuing a run may change only its budget "
                f"({', '.join(keys) or 'nothing'}), since its checkpoints hold a run of the "
                f"other values; start a new run (another --name) for {key}"
            )
        if not changed:
            return stored
        n = max((k for k, _ in self.earlier_configs()), default=0) + 1
        earlier = self.path / f"config.{n}.yaml"
        text = config_path.read_bytes()
        with _writing(earlier, self.path):
            _write_atomic(earlier, text)
        with _writing(config_path, self.path):
            _replace_with(config_path, lambda tmp: save_config(cfg, tmp))
        return yaml.safe_load(config_path.read_text()) or {}

    def earlier_configs(self) -> list[tuple[int, Path]]:
        """The configs the run ran under before it was continued, ``(n, config.<n>.yaml)``,
        oldest first."""
        found = self.path.iterdir()
        return sorted((int(m[1]), p) for p in found if (m := _EARLIER_CONFIG.fullmatch(p.name)))

    # -- metrics -----------------------------------------------------------------------------
    def log(self, **metrics: float | int | str) -> None:
        """Append one row to ``metrics.csv`` (the first row fixes the columns)."""
        with _writing(self.metrics_path, self.path):
            if self._columns is None:
                self._columns = list(metrics)
                with self.metrics_path.open("w", newline="") as f:
                    csv.writer(f).writerow(self._columns)
            missing = set(metrics) - set(self._columns)
            if missing:
                raise ValueError(
                    f"metrics {sorted(missing)} are not columns of {self.metrics_path}"
                )
            with self.metrics_path.open("a", newline="") as f:
                csv.writer(f).writerow([_fmt(metrics.get(c, "")) for c in self._columns])
        self._write_scalars(metrics, step=_step_of(metrics, self._rows))
        self._rows += 1
        if self.keep_best is not None:  # the next checkpoint is judged by this row
            value = metrics.get(self.keep_best)
            real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            ok = real and math.isfinite(value)
            self._candidate = (float(value), self._rows) if ok else None

    def checkpoint_columns(self) -> dict[str, float | str]:
        """The metric columns of the latest checkpoint saved or read: ``checkpoint_mb``, its
        size in MB (10^6 bytes), and ``checkpoint_seconds``, the seconds its write took (empty
        before the first checkpoint, and the seconds after a resume). A row is logged before
        its own checkpoint is written, so a row shows the checkpoint before it."""
        return {
            "checkpoint_mb": self._checkpoint_mb,
            "checkpoint_seconds": self._checkpoint_seconds,
        }

    def _write_scalars(self, metrics: dict[str, Any], step: int) -> None:
        if self.tensorboard_path is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_path), purge_step=self._purge_step)
        for key, value in metrics.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer and let go of the folder's lock."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def request_stop(self) -> None:
        """Ask the training loop to stop at its next checkpoint (the CLI's first Ctrl-C)."""
        self.stop_requested = True

    def metrics(self) -> list[dict[str, str]]:
        """The rows of ``metrics.csv`` as dicts of strings."""
        if not self.metrics_path.exists():
            return []
        with self.metrics_path.open(newline="") as f:
            return list(csv.DictReader(f))

    def _count_rows(self) -> int:
        return len(self.metrics())

    def _read_columns(self) -> list[str] | None:
        if not self.metrics_path.exists():
            return None
        with self.metrics_path.open(newline="") as f:
            return next(csv.reader(f), None)

    def _truncate_metrics(self, rows: int) -> None:
        """Drop rows logged after the checkpoint (a run killed between log and checkpoint)."""
        all_rows = self.metrics()
        kept = all_rows[:rows]
        if self._columns is None:
            return
        if len(all_rows) > rows:  # TensorBoard hides its events from the first dropped step on
            self._purge_step = _step_of(all_rows[rows], rows)

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._columns)
                writer.writeheader()
                writer.writerows(kept)

        with _writing(self.metrics_path, self.path):
            _replace_with(self.metrics_path, write)
        self._rows = len(kept)

    # -- checkpoints ---------------------------------------------------------------------------
    def kept_checkpoints(self) -> list[tuple[int, Path]]:
        """The numbered checkpoints in the folder, ``(n, path)``, newest first."""
        return numbered_checkpoints(self.path)

    @property
    def has_checkpoint(self) -> bool:
        """Whether the folder holds a checkpoint to resume from."""
        return self.checkpoint_path.exists() or bool(self.kept_checkpoints())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``state`` (tensors, numbers, strings, lists, dicts) as the next numbered
        checkpoint, with the config digest, the number of metric rows it covers and the sha256
        of its content; point ``checkpoint.pt`` at it (and ``checkpoint-best.pt`` when the last
        row logged beats the best so far, with ``keep_best``) and drop the checkpoints no longer
        kept.

        Raises:
            RunFolderError: the disk is full or the folder cannot be written (the temporary
                file is removed and the previous checkpoint stays the latest).
        """
        t0 = time.perf_counter()
        seq = self._sequence + 1
        best, cand = self._best, self._candidate
        if cand is not None and (best is None or cand[0] > best["value"]):
            best = {"sequence": seq, "value": cand[0], "row": cand[1]}
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config_hash": self.hash,
            "metrics_rows": self._rows,
            "sequence": seq,
            "state": _compact(state),
        }
        if self.keep_best is not None:
            payload["best"] = best  # the best so far, this checkpoint included
        payload["digests"] = _digests(payload)
        target = self.path / f"checkpoint-{seq}.pt"
        with _writing(target, self.path):
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = buffer.getbuffer()
            _write_atomic(target, data)
        with _writing(self.checkpoint_path, self.path):
            self._point_latest_at(target, data)
        if best is not None and best is not self._best:
            self._point_best_at(target, best, data)
        self._best, self._candidate = best, None
        self._prune(seq)
        self._sequence, self._latest, self._latest_rows = seq, target, self._rows
        self._checkpoint_mb = len(data) / 1e6
        self._checkpoint_seconds = time.perf_counter() - t0

    def _point_latest_at(self, target: Path, data: Any = None) -> None:
        """Make ``checkpoint.pt`` a second name of ``target`` (a copy without hard links)."""
        _second_name(self.checkpoint_path, target, data)

    def _point_best_at(self, target: Path, best: dict[str, Any], data: Any = None) -> None:
        """Make ``checkpoint-best.pt`` a second name of ``target`` and say so in ``best.yaml``."""
        record = {
            "checkpoint": f"checkpoint-{best['sequence']}.pt",
            "sequence": best["sequence"],
            "column": self.keep_best,
            "value": best["value"],
            "metrics_row": best["row"],
        }
        text = yaml.safe_dump(record, sort_keys=False).encode()
        with _writing(self.path / BEST, self.path):
            _second_name(self.path / BEST, target, data)
            _write_atomic(self.path / BEST_RECORD, text)

    def best_record(self) -> dict[str, Any] | None:
        """``best.yaml``: which checkpoint ``checkpoint-best.pt`` is (``checkpoint``,
        ``sequence``), by which ``column`` and ``value``, after which ``metrics_row``
        (1-based); ``None`` when the folder has none (or it cannot be read)."""
        return read_best_record(self.path)

    def _sync_best(self, source: Path, seq: int) -> None:
        """After reading checkpoint ``seq``: make ``checkpoint-best.pt`` the best checkpoint
        up to it (as that checkpoint records), or drop it when that one is no longer kept."""
        record = self.best_record()
        on_disk = record.get("sequence") if record else None
        want = self._best["sequence"] if self._best else None
        if on_disk == want and (want is None or (self.path / BEST).exists()):
            return
        kept = dict(self.kept_checkpoints())
        file = source if want == seq else kept.get(want)
        if file is not None:
            self._point_best_at(file, self._best)
            return
        with _writing(self.path / BEST, self.path):
            (self.path / BEST).unlink(missing_ok=True)
            (self.path / BEST_RECORD).unlink(missing_ok=True)

    def _prune(self, newest: int) -> None:
        for n, p in self.kept_checkpoints():
            old = n <= newest - self.keep_checkpoints
            if old and not (self.keep_every and n % self.keep_every == 0):
                p.unlink(missing_ok=True)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state of the latest checkpoint (``checkpoint.pt``, else the newest numbered
        one, or the ``resume_from`` one), or ``None`` when there is none.

        Rows of ``metrics.csv`` logged after that checkpoint are dropped, since the resumed
        run logs them again, and so are the numbered checkpoints after it; it becomes
        ``checkpoint.pt``.

        Raises:
            CheckpointError: corrupt, truncated or empty file, content that does not match its
                digests, another format, or another config; the message names the last good
                checkpoint kept, if any.
        """
        kept = self.kept_checkpoints()
        source = self._resume_from
        if source is None:
            source = self.checkpoint_path if self.checkpoint_path.exists() else None
        if source is None and kept:
            source = kept[0][1]
        if source is None:
            self._truncate_metrics(0)
            return None
        try:
            payload = load_checkpoint_file(source)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; {self._fallback(source, kept)}") from None
        self._check_config(source, payload)
        seq = int(payload.get("sequence", 0))
        with _writing(self.checkpoint_path, self.path):
            if source != self.checkpoint_path:
                self._point_latest_at(source)
            for n, p in kept:
                if n > seq:
                    p.unlink()
        if self.keep_best is not None:
            best = payload.get("best")
            self._best = best if isinstance(best, dict) else None
            self._sync_best(source, seq)
        self._truncate_metrics(int(payload["metrics_rows"]))
        self._sequence, self._latest, self._latest_rows = seq, source, self._rows
        self._checkpoint_mb = source.stat().st_size / 1e6
        self._checkpoint_seconds = ""
        return payload["state"]

    def _check_config(self, path: Path, payload: dict[str, Any]) -> None:
        if payload["config_hash"] not in self._accepted_hashes:
            raise CheckpointError(
                f"{path} was written by a run with another config "
                f"(digest {payload['config_hash']}, this config {self.hash}); resume with the "
                f"run's own config.yaml, or start a new run under another --name"
            )

    def _fallback(self, bad: Path, kept: list[tuple[int, Path]]) -> str:
        """Where to go on from: the newest kept checkpoint other than ``bad`` that loads."""
        for _, p in kept:
            if _same_file(p, bad):
                continue
            try:
                self._check_config(p, load_checkpoint_file(p))
            except CheckpointError:
                continue
            return (
                f"the last good checkpoint is {p}: continue from it with "
                f"`mbrl resume {self.path} --from {p.name}`"
            )
        return (
            f"{self.path} keeps no other good checkpoint: start the run over with its "
            "`mbrl run` command and --overwrite"
        )

    def latest_checkpoint_text(self) -> str:
        """Which checkpoint a resume continues from, in words, for messages."""
        if self._latest is None:
            if not self.has_checkpoint:
                return "no checkpoint was written yet (a resume starts the run from the beginning)"
            return f"the latest checkpoint is {self.checkpoint_path}"
        where = f"row {self._latest_rows} of metrics.csv"
        rows, cols = self.metrics(), self._columns
        if cols and 0 < self._latest_rows <= len(rows):
            where += f": {cols[0]}={rows[self._latest_rows - 1][cols[0]]}"
        return f"the latest checkpoint is {self._latest} (after {where})"


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """Read a checkpoint file with ``weights_only=True`` and check its content digests.

    Raises:
        CheckpointError: an empty, truncated or corrupt file, a payload that is not an mbrl
            checkpoint, or content that does not match its digests.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), a write that never ended")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, forbidden global ...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and was refused ({type(e).__name__}: "
            f"{first})"
        ) from e
    version = payload.get("format") if isinstance(payload, dict) else None
    if version == 1 and "digests" not in payload:
        warnings.warn(
            f"{path} is a checkpoint of format 1, from before checkpoints carried content "
            "digests; it is read unverified",
            stacklevel=2,
        )
        return payload
    if version != CHECKPOINT_FORMAT or not isinstance(payload.get("digests"), dict):
        raise CheckpointError(
            f"checkpoint {path} is not an mbrl checkpoint of format {CHECKPOINT_FORMAT} "
            f"(format {version!r})"
        )
    stored = payload.pop("digests")
    actual = _digests(payload)
    if stored != actual:
        bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k))
        what = (
            "its counters, RNG states or config digest"
            if bad == [""]
            else "tensor " + ", ".join(k for k in bad if k)[:200]
        )
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {what} does not match the sha256 written with it"
        )
    return payload


def _digests(payload: dict[str, Any]) -> dict[str, str]:
    """The sha256 of every tensor in ``payload``, by its path (``state/parts/buffer/obs``), and
    under ``""`` that of everything else: keys, numbers, strings, the tensors' places."""
    out: dict[str, str] = {}
    rest = hashlib.sha256()

    def put(text: str) -> None:
        rest.update(text.encode() + b"\0")

    def walk(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            h = hashlib.sha256(f"{flat.dtype}{tuple(value.shape)}".encode())
            h.update(flat.view(torch.uint8).numpy().data)
            out[path] = h.hexdigest()
            put(f"T{path}")
        elif isinstance(value, dict):
            put(f"D{len(value)}{sorted(getattr(value, '__dict__', {}).items())!r}")
            for k, v in value.items():
                put(f"K{type(k).__name__}:{k!r}")
                walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(value, list | tuple):
            put(f"{type(value).__name__}{len(value)}")
            for i, v in enumerate(value):
                walk(v, f"{path}/{i}")
        else:
            put(f"V{type(value).__name__}:{value!r}")

    walk(payload, "")
    out[""] = rest.hexdigest()
    return out


def _compact(value: Any) -> Any:
    """``value`` with every tensor that views a larger storage copied out of it, so that a
    checkpoint holds the tensors' own bytes only (``torch.save`` writes whole storages)."""
    if isinstance(value, torch.Tensor):
        if value.untyped_storage().nbytes() > value.numel() * value.element_size():
            return value.clone()
        return value
    if isinstance(value, dict):
        out = type(value)((k, _compact(v)) for k, v in value.items())
        if hasattr(value, "__dict__"):
            out.__dict__.update(value.__dict__)  # a module state dict's _metadata
        return out
    if isinstance(value, list | tuple):
        return type(value)(_compact(v) for v in value)
    return value


# -- files -------------------------------------------------------------------------------------
class _FolderLock:
    """The exclusive ``flock`` on a run folder's ``run.lock``, one per folder and process
    (runs of the same folder opened twice in one process share it)."""

    _held: dict[str, _FolderLock] = {}

    def __init__(self, key: str, file: Any) -> None:
        self.key, self.file, self.holders = key, file, 1

    @classmethod
    def acquire(cls, folder: Path, shared: bool = True) -> _FolderLock:
        """The folder's lock; ``shared``: also when this process holds it already."""
        key = os.path.realpath(folder)
        held = cls._held.get(key)
        if held is not None and not shared:
            raise RunFolderError(
                f"run {folder} is being written by this process ({os.getpid()}); close that "
                "Run first"
            )
        if held is not None:
            held.holders += 1
            return held
        path = folder / LOCK
        with _writing(path, folder):
            file = open(path, "a+")  # noqa: SIM115  (held open for the run's life)
        if fcntl is not None:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                file.seek(0)
                pid = file.read().strip() or "unknown"
                file.close()
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunFolderError(f"cannot lock {path}: {e.strerror}") from None
                raise RunFolderError(
                    f"run {folder} is being written by process {pid}; wait for it to end (or "
                    f"stop it: kill -INT {pid}), then `mbrl resume {folder}`"
                ) from None
        with _writing(path, folder):
            file.seek(0)
            file.truncate()
            file.write(f"{os.getpid()}\n")
            file.flush()
        lock = cls(key, file)
        cls._held[key] = lock
        return lock

    def release(self) -> None:
        if self.holders == 0:
            return
        self.holders -= 1
        if self.holders == 0:
            self._held.pop(self.key, None)
            self.file.close()  # closing the file drops the flock


def never_started(path: Path) -> bool:
    """Whether the run folder ``path`` was never started: empty, or holding only what a
    :class:`Run` writes before ``run.yaml`` (``run.lock``, then ``config.yaml``), its making
    interrupted. A new run of the same name takes it over."""
    names = {p.name for p in Path(path).iterdir() if not p.name.endswith(".tmp")}
    return names <= {LOCK, "config.yaml"} and ("config.yaml" not in names or LOCK in names)


def _exists_message(path: Path) -> str:
    """Why a new run cannot be made at ``path``, and what to do instead."""
    if not path.is_dir():
        return f"{path} is a file, not a run folder; pick another --name or --runs-dir"
    if (path / LATEST).exists() or any(_NUMBERED.fullmatch(p.name) for p in path.iterdir()):
        return (
            f"run folder {path} already exists and holds a checkpoint; continue it with "
            f"`mbrl resume {path}`, replace it with --overwrite, or pick another --name"
        )
    resumable = (path / "config.yaml").exists() and (path / "run.yaml").exists()
    resume = f" (or `mbrl resume {path}`)" if resumable else ""
    return (
        f"run folder {path} already exists but holds no checkpoint yet; start it over with "
        f"--overwrite{resume}, or pick another --name"
    )


@contextmanager
def _writing(path: Path, run: Path, making: bool = False) -> Iterator[None]:
    """Turn a full disk or a refused write of ``path`` into a :class:`RunFolderError` that
    says so and what to do."""
    try:
        yield
    except OSError as e:
        if isinstance(e, FileExistsError | FileNotFoundError | IsADirectoryError):
            raise
        if e.errno == errno.ENOSPC:
            then = "run it again" if making else f"continue with `mbrl resume {run}`"
            raise RunFolderError(
                f"no space left on device while writing {path}; free some space, then {then} "
                "(the checkpoints written before are intact)"
            ) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = "pick a writable --runs-dir" if making else f"make {run} writable"
            raise RunFolderError(f"cannot write {path} ({e.strerror}); {where}") from None
        raise


def _write_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to ``path.tmp``, flush it to disk and rename it to ``path``; a failure
    removes the temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _second_name(path: Path, target: Path, data: Any = None) -> None:
    """Make ``path`` a second name (hard link) of ``target``, atomically; a copy (of ``data``,
    the bytes of ``target`` when given) where the file system has no hard links."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        _write_atomic(path, target.read_bytes() if data is None else data)
    else:
        os.replace(tmp, path)
    _fsync_folder(path.parent)


def numbered_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """The numbered checkpoints of a run folder, ``(n, checkpoint-<n>.pt)``, newest first."""
    found = [(int(m[1]), p) for p in Path(folder).iterdir() if (m := _NUMBERED.fullmatch(p.name))]
    return sorted(found, reverse=True)


def read_best_record(folder: str | Path) -> dict[str, Any] | None:
    """The run folder's ``best.yaml`` (see :meth:`Run.best_record`), or ``None``."""
    try:
        record = yaml.safe_load((Path(folder) / BEST_RECORD).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _replace_with(path: Path, write: Any) -> None:
    """``write(tmp)``, then rename ``tmp`` to ``path``; a failure removes ``tmp``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _step_of(row: dict[str, Any], index: int) -> int:
    """A row's TensorBoard step: its ``env_steps``, else its index."""
    value = row.get("env_steps", "")
    return int(float(value)) if value not in ("", None) else index


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# -- RNG state ---------------------------------------------------------------------------------
def numpy_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy generator's state as a checkpoint-safe dict (big ints as strings)."""
    state = rng.bit_generator.state
    return json.loads(json.dumps(state, default=str), parse_int=str)


def set_numpy_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = _ints(state)


def _ints(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value
