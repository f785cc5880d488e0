"""Set-up of a test process, before any test module imports torch.

The README's test command runs the suite in two pytest-xdist workers (`-n 2`), one per core of a 2-core machine. Each
worker then gets one torch thread, and OpenMP sleeps rather than spins while it waits: next to another busy process a
spinning OpenMP thread makes every small op wait a scheduler tick (omp.py, benchmarks/busy.md). The programs a test
starts inherit both through the environment. A value the user set is kept; a plain `pytest` run is left alone.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
