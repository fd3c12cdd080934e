"""The process of one attempt of a sweep's run:
``python -m mbrl.sweep.child THREADS PARENT_PID ARGS...`` sets torch's threads to ``THREADS``
(the run's CPU share) and runs ``mbrl ARGS...`` (``run ...`` or ``resume ...``) as the command
line does, exit status included.

On Linux it is killed when the worker that started it goes away (``PR_SET_PDEATHSIG``): a
killed sweep or a lost Ray worker leaves no run behind holding its ``run.lock``, and the next
``mbrl sweep --resume`` continues the run from its last checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux; elsewhere a no-op),
    and end now if the parent ``parent`` has gone already."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    _die_with_parent(int(argv[1]))
    import torch

    from mbrl import cli

    torch.set_num_threads(int(argv[0]))
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
