"""OpenMP's wait policy, set before torch loads (libgomp reads it once, when torch is
imported): the task scripts import this module first.

By default OpenMP threads spin between parallel regions, waiting for work. On a machine
whose cores are busy with other processes they spin against those processes: a tiny
model on a 2-core machine at load 5 ran 3-4x slower with torch's default threads than with
one thread (README, "Threads on a busy CPU"). A passive policy lets a waiting thread sleep,
which costs little when the machine is idle. A value given in the environment is kept, and
OMP_NUM_THREADS=1 is still the fastest setting on a machine busy with other work.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
