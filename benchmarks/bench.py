"""The benchmarks' command line (README "Performance"), a dispatcher: --estimate and --full-size run
benchmarks/estimate.py (the memory/FLOP budget estimator, the full-size 1.7B check); anything else runs
benchmarks/compare.py (ours vs diffusers side by side -> benchmarks/results.md). All three files take the same options
(--help lists them); the methods are in those two files' docstrings.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: run as a script from anywhere
import omp  # noqa: E402, F401  (before torch loads OpenMP: the wait policy for this machine, omp.py)

import compare
import estimate

if __name__ == "__main__":
    args = estimate.parse_args()  # the one parser of the three files: --help and bad options end here
    (estimate if args.estimate or args.full_size else compare).main()
