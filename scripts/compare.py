#!/usr/bin/env python
"""Run the benchmark scenarios on three schedulers in one run and print the ratios.

    python scripts/compare.py [SCENARIO ...|all] [bench.py options]

Same as ``python scripts/bench.py --vs ...``: every scenario on this repository's
taskiq-beat, on Taskiq's own ``TaskiqScheduler`` (taskiq 0.13, its loop driven in-process
as ``taskiq scheduler`` does), and on taskiq-beat 1.4.0 from PyPI, which needs Python >= 3.12:
a venv ``.bench-venvs/taskiq-beat-1.4.0`` is made with the first ``python3.12`` (or newer)
found (``BENCH_PYTHON312=/path/to/python`` picks one) and ``pip install taskiq-beat==1.4.0``;
1.4.0 is skipped, with a message, when there is none. Prints the full table, then ours
against each of the others.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import main

if __name__ == "__main__":
    sys.exit(main(["--vs", *sys.argv[1:]]))
