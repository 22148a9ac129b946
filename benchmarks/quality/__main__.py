"""Entry point: ``python -m benchmarks.quality --out DIR [--quick] [--scale wan1.3b]``."""

import sys

from benchmarks.quality.cli import main

sys.exit(main())
