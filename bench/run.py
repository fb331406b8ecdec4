"""``python bench/run.py``: the forwarder's benchmark (see bench/README.md).

Starts a private Redis, a stand-in engagement API and the contenders, each in its own
process on 127.0.0.1, prints a table of figures (``--json FILE`` for the raw ones) and
stops everything it started, also on Ctrl-C.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable (bench.*, forwarder.*).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
