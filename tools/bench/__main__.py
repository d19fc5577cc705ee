"""Entry point of ``python -m tools.bench`` (``make bench``)."""

import sys

from tools.bench.cli import main

sys.exit(main())
