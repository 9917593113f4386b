"""``python -m kvbench.cli``: the command line (torchrun launches sweeps this way)."""

import sys

from kvbench.cli import main

sys.exit(main())
