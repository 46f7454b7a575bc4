"""``python benchmarks/pool [OPTIONS]`` (or ``python -m pool`` from ``benchmarks/``)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a directory: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pool.cli import main
else:
    from .cli import main

sys.exit(main())
