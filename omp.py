"""OpenMP's wait policy for the entry points, chosen before torch loads OpenMP (libgomp reads it once, at load).

torch's CPU kernels run on OpenMP threads that by default spin for a while at the end of every parallel region. When
another process keeps a core busy, the spinning thread and the descheduled one it waits for make every small op wait
a scheduler tick: the toy demo's training step goes from 0.75-0.8 s to 3.4 s next to one busy process. Sleeping
instead of spinning (OMP_WAIT_POLICY=PASSIVE) keeps it at 1.1x, but costs ~20% on an idle machine (benchmarks/busy.md).
So the policy follows the machine: PASSIVE if other processes keep half a core or more busy while the program starts
(sampled over 0.2 s), libgomp's default otherwise. A setting of the user's (OMP_WAIT_POLICY, GOMP_SPINCOUNT) is kept.
Only entry points change this process-wide setting, and only when run as a script, before torch is imported:

    if __name__ == "__main__":  # before torch loads OpenMP, which reads its wait policy once (omp.py)
        import omp
        omp.choose_wait_policy()

Processes they start (torchrun ranks, the demo's scoring worker) inherit the choice through the environment.
"""

import os
import time


def busy_cores(seconds: float = 0.2) -> float:
    """Cores kept busy by other processes over `seconds` (Linux /proc/stat; elsewhere the 1-minute load average)."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]  # the "cpu" line: user nice system idle iowait ...
        return sum(ticks), ticks[3] + ticks[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)  # this process sleeps meanwhile, so what is busy is someone else
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def choose_wait_policy():
    """OMP_WAIT_POLICY=PASSIVE if other processes keep half a core or more busy now; a user's own setting is kept."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ and busy_cores() >= 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
