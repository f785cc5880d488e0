"""The toy demo's training step on an idle CPU and next to one busy single-thread process, per OpenMP setting.

    python benchmarks/busy.py                      # ~10 min on 2 cores; appends a table to benchmarks/busy.md

Why: torch's CPU kernels run on OpenMP threads (libgomp). With libgomp's default wait policy a thread that reaches the
end of a parallel region spins for a while before sleeping; when another process holds one of the two cores, the
spinning thread and the descheduled one it waits for make every small op wait a scheduler tick (7-16x slower steps,
measured in docs/benchmarks.md). The entry points (train.py, sample.py, evaluate.py, the toy scripts, benchmarks)
call omp.choose_wait_policy() first, which sets OMP_WAIT_POLICY=PASSIVE when other processes keep half a core or more busy as the
program starts, and leaves libgomp's default otherwise (a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept). Each row here is a fresh `python train.py` (no --model: the toy
model with the demo's settings, 8 frames at 32x32, batch 4 + 4 regularization clips) run for --steps steps with the
given environment; the step time is the median of the logged intervals after the first (warm-up) one.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> environment changes (None = unset). libgomp with OMP_WAIT_POLICY unset spins GOMP_SPINCOUNT = 300,000 times
# before sleeping (its documented default); setting GOMP_SPINCOUNT explicitly keeps the entry points' default away.
SETTINGS = {
    "libgomp default (before)": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"},
    "entry point default (omp.py: PASSIVE only on a busy CPU)": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},
    "OMP_WAIT_POLICY=PASSIVE always": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None},
    "libgomp default, 1 thread": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000", "OMP_NUM_THREADS": "1"},
    "GOMP_SPINCOUNT=30000": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "30000"},
    "GOMP_SPINCOUNT=10000": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=3000": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "3000"},
}


def step_time(env_changes: dict, steps: int, clips: Path) -> float:
    """Median seconds per training step of a toy run with these environment changes."""
    env = dict(os.environ)
    for k, v in env_changes.items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), "--videos", str(clips), "--steps", str(steps), "--log-every",
               "5", "--ckpt-every", "0", "--out", str(Path(tmp) / "run")]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["sec_per_step"] for r in log[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per run (logged every 5)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "busy.md"), help="markdown file to append to")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                   help="which rows to run (default: all)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from toy import world

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        world.write_folder(world.make_dataset(8, ["moving in a circle"], seed=1000), Path(tmp) / "clips")
        for name in args.settings:
            env = SETTINGS[name]
            idle = step_time(env, args.steps, Path(tmp) / "clips")
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one busy single-thread process
            try:
                time.sleep(1)
                busy = step_time(env, args.steps, Path(tmp) / "clips")
            finally:
                hog.kill()
                hog.wait()
            rows.append((name, idle, busy))
            print(f"{name}: idle {idle:.3f} s/step, busy {busy:.3f} s/step ({busy / idle:.2f}x)", flush=True)
    base = rows[0][1]  # the first row run is the reference of the last column
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')}: `python benchmarks/busy.py --steps {args.steps}`, "
             f"{os.cpu_count()} cores, torch's default threads unless stated\n",
             "| OpenMP setting | idle s/step | next to 1 busy process | busy / idle | idle vs libgomp default |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {i:.3f} | {b:.3f} | {b / i:.2f}x | {i / base:.2f}x |" for n, i, b in rows]
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
