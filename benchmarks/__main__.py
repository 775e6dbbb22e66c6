"""``python -m benchmarks``: every benchmark beside its anchors, in one command (run.py)."""

import sys

from benchmarks.run import main

sys.exit(main())
