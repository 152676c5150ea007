"""The benchmarks' clock: seconds per call, and medians of calls timed in turn; and the
folder of real text they read by default."""

import os
import statistics
import time
from pathlib import Path

import torch

# Real data slices, in the folder BERT_TEST_DATA names (the tests' too); each benchmark
# falls back to synthetic text, or asks for a file, when one is absent.
REAL_DATA = Path(os.environ.get("BERT_TEST_DATA") or "/nonexistent/BERT_TEST_DATA-unset")


def seconds_per_call(fn, calls, device):
    # CUDA runs asynchronously: wait for the queued work before and after the clock.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def interleaved_medians(calls, rounds, device):
    """Median seconds per call of each {name: (fn, calls per round)}, all timed in turn
    within every round, so that a busy neighbour or a clock change hits each alike."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, n) in calls.items():
            times[name].append(seconds_per_call(fn, n, device))
    return {name: statistics.median(t) for name, t in times.items()}
