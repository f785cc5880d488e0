"""The benchmarks' command line (README "Performance"), a dispatcher: --estimate and --full-size run
benchmarks/estimate.py (the memory/FLOP budget estimator, the full-size 1.7B check); anything else runs
benchmarks/compare.py (ours vs diffusers side by side -> benchmarks/results.md). All three files take the same options
(--help lists them); the methods are in those two files' docstrings.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:  # read when torch loads OpenMP
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # idle threads sleep instead of spinning: README "A busy CPU"

import compare
import estimate

if __name__ == "__main__":
    args = estimate.parse_args()  # the one parser of the three files: --help and bad options end here
    (estimate if args.estimate or args.full_size else compare).main()
