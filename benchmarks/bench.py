"""The benchmarks' command line (docs/benchmarks.md, docs/memory.md), a dispatcher: --estimate and --full-size run
benchmarks/estimate.py (the memory/FLOP budget estimator, the full-size 1.7B check); anything else runs
benchmarks/compare.py (ours vs diffusers side by side -> benchmarks/results.md). All three files take the same options
(--help lists them; harness.py holds what they share); the methods are in those two files' docstrings.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`: the repository root
    import omp  # before torch loads OpenMP, which reads its wait policy once (omp.py)
    omp.choose_wait_policy()

import harness

import compare
import estimate

if __name__ == "__main__":
    args = harness.parse_args()  # the one parser of the three files: --help and bad options end here
    (estimate if args.estimate or args.full_size else compare).main()
