"""A run folder: resolved config, ``metrics.csv``, checkpoints and plots.

Layout of ``runs/<name>/``::

    config.yaml       the resolved config (what ``mbrl resume`` reads back)
    run.yaml          algorithm, env, seed and device of the run
    metrics.csv       one row per logged step (episodes for PETS)
    tensorboard/      the same numbers as TensorBoard scalars (``tensorboard --logdir runs``)
    checkpoint.pt     the latest checkpoint, written atomically
    learning_curve.png

Checkpoints are written to a temporary file and renamed, so a run killed at any moment leaves
the previous checkpoint intact. They hold only tensors, numbers, strings, lists and dicts and
are read with ``torch.load(weights_only=True)``: nothing in them is ever executed. What a
training loop saves is one typed record, :class:`mbrl.algorithms.loop.Checkpoint`. A resumed run
drops the metric rows logged after its checkpoint, in ``metrics.csv`` and in TensorBoard (whose
events from that step on are purged).
"""

from __future__ import annotations

import csv
import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mbrl.config import save_config, to_dict

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, truncated, or from another config."""


def _dict_hash(d: dict) -> str:
    """A stable digest of a config's plain-dict form."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _is_subset(part: Any, whole: Any) -> bool:
    """``part`` equals ``whole`` except for keys ``whole``'s dicts have in addition."""
    if isinstance(part, dict) and isinstance(whole, dict):
        return all(k in whole and _is_subset(v, whole[k]) for k, v in part.items())
    return part == whole


class Run:
    """The folder of one run.

    Args:
        path: ``runs/<name>``; created if missing.
        cfg: the resolved config dataclass (saved as ``config.yaml`` on creation).
        meta: algorithm, env, seed, device: what the CLI needs to resume the run.
        tensorboard: also write every numeric metric as a TensorBoard scalar under
            ``path/tensorboard``, at the row's ``env_steps`` (the row index when it has none).
    """

    def __init__(
        self,
        path: str | Path,
        cfg: Any,
        meta: dict[str, Any] | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        full = to_dict(cfg)
        self.hash = _dict_hash(full)
        self.metrics_path = self.path / "metrics.csv"
        self.checkpoint_path = self.path / "checkpoint.pt"
        if not (self.path / "config.yaml").exists():
            save_config(cfg, self.path / "config.yaml")
        # Digests a checkpoint of this config may carry: the current one, and that of the config
        # as this run first saved it when a field was added (with a default) since.
        stored = yaml.safe_load((self.path / "config.yaml").read_text()) or {}
        self._accepted_hashes = {self.hash}
        if _is_subset(stored, full):
            self._accepted_hashes.add(_dict_hash(stored))
        if meta is not None and not (self.path / "run.yaml").exists():
            with (self.path / "run.yaml").open("w") as f:
                yaml.safe_dump(meta, f, sort_keys=False)
        self._rows = self._count_rows()
        self._columns: list[str] | None = self._read_columns()
        self.tensorboard_path = self.path / "tensorboard" if tensorboard else None
        self._writer = None  # opened at the first log: importing tensorboard takes a second
        self._purge_step: int | None = None

    # -- metrics -----------------------------------------------------------------------------
    def log(self, **metrics: float | int | str) -> None:
        """Append one row to ``metrics.csv`` (the first row fixes the columns)."""
        if self._columns is None:
            self._columns = list(metrics)
            with self.metrics_path.open("w", newline="") as f:
                csv.writer(f).writerow(self._columns)
        missing = set(metrics) - set(self._columns)
        if missing:
            raise ValueError(f"metrics {sorted(missing)} are not columns of {self.metrics_path}")
        with self.metrics_path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(metrics.get(c, "")) for c in self._columns])
        self._write_scalars(metrics, step=_step_of(metrics, self._rows))
        self._rows += 1

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
        """Flush and close the TensorBoard writer (metrics.csv needs no closing)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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
        with self.metrics_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(kept)
        self._rows = len(kept)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically write ``state`` (tensors, numbers, strings, lists, dicts) with the config
        digest and the number of metric rows it covers."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config_hash": self.hash,
            "metrics_rows": self._rows,
            "state": state,
        }
        tmp = self.checkpoint_path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state of the latest checkpoint, or ``None`` when there is none.

        Rows of ``metrics.csv`` logged after that checkpoint are dropped, since the resumed
        run logs them again.

        Raises:
            CheckpointError: corrupt or truncated file, another format, or another config.
        """
        if not self.checkpoint_path.exists():
            self._truncate_metrics(0)
            return None
        payload = load_checkpoint_file(self.checkpoint_path)
        if payload["config_hash"] not in self._accepted_hashes:
            raise CheckpointError(
                f"{self.checkpoint_path} was written by a run with another config "
                f"(digest {payload['config_hash']}, this config {self.hash}); resume with the "
                f"run's own config.yaml, or start a new run under another --name"
            )
        self._truncate_metrics(int(payload["metrics_rows"]))
        return payload["state"]


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint file with ``weights_only=True``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, forbidden global ...
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and was refused ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); delete it to restart the run from scratch"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not an mbrl checkpoint of format {CHECKPOINT_FORMAT}"
        )
    return payload


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
