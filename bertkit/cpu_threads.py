"""OpenMP's wait policy, chosen before torch loads (libgomp reads it once, when torch is
imported): the task scripts import this module first.

By default OpenMP threads spin between parallel regions, waiting for work. On a machine
whose cores are busy with other processes they spin against those processes: a tiny
model on a 2-core machine at load 5 ran 2-5x slower with torch's default than with a
passive policy, where a waiting thread sleeps. On an idle machine the spinning pays: the
passive policy made a training step 8-23% slower there (README, "Threads on a busy
CPU"). So the policy is passive only when other processes already keep at least half of
the CPUs busy, sampled over a tenth of a second at start; a value given in the
environment is always kept. OMP_NUM_THREADS=1 is still the fastest setting on a machine
busy with other work.
"""

import os
import time

BUSY = 0.5  # the share of the machine's CPU time others use, from which threads wait passively


def busy_share(seconds=0.1):
    """The share of the machine's CPU time spent outside idle over `seconds` (while this
    process sleeps: other processes' work), from /proc/stat; 0 where it cannot be read."""

    def counters():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        total, idle = counters()
        time.sleep(seconds)
        total_after, idle_after = counters()
    except (OSError, ValueError, IndexError):
        return 0.0
    spent = total_after - total
    return 1 - (idle_after - idle) / spent if spent > 0 else 0.0


def wait_policy(environ, busy):
    """The OMP_WAIT_POLICY to set, or None to leave the environment (and OpenMP) as it is."""
    if "OMP_WAIT_POLICY" in environ or busy < BUSY:
        return None
    return "PASSIVE"


if "OMP_WAIT_POLICY" not in os.environ:
    policy = wait_policy(os.environ, busy_share())
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
