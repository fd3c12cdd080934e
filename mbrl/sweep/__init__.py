"""Sweeps: many seeds and settings of one or more algorithms, as ordinary run folders.

``mbrl sweep ALGO --seeds 0-9 [key=a,b ...] --backend local|ray`` expands seeds and value
lists into runs (:func:`expand`), writes their states into ``runs/sweep-<name>/sweep.yaml``
(:class:`Manifest`), runs them in a local pool of processes or as Ray tasks
(:func:`run_sweep` on a :class:`LocalPool` or :class:`RayPool`), each attempt an ordinary
``mbrl run`` or ``mbrl resume`` in a process of its own, and ends with one report
(:func:`sweep_report`): an aggregate table per setting, paired comparisons by seed and one plot
with mean and confidence band per setting. The run folders sit inside the sweep folder, so
``mbrl resume``, ``mbrl eval`` and ``mbrl plot`` work on each.
"""

from mbrl.sweep.execute import LiveView, LocalPool, RayPool, SweepResult, available_cpus, run_sweep
from mbrl.sweep.manifest import Manifest, RunRecord, SweepFolderError
from mbrl.sweep.plan import RunSpec, expand, parse_seeds
from mbrl.sweep.report import Report, estimate, sweep_report, t_test_p

__all__ = [
    "LiveView",
    "LocalPool",
    "Manifest",
    "RayPool",
    "Report",
    "RunRecord",
    "RunSpec",
    "SweepFolderError",
    "SweepResult",
    "available_cpus",
    "estimate",
    "expand",
    "parse_seeds",
    "run_sweep",
    "sweep_report",
    "t_test_p",
]
