"""``python -m mbrl``: the ``mbrl`` command line (:mod:`mbrl.cli`)."""

import sys

from mbrl.cli import main

sys.exit(main())
