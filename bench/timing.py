"""Timing shared by the benchmarks."""

import statistics
import time


def median_times(fns: dict, repeats: int) -> dict:
  """Median wall time (s) of each blocking `fn()`, timed round-robin so that load from other
  processes on a shared machine hits every contender alike."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
