"""Timing shared by the benchmarks."""

import statistics
import time


def median_times(fns: dict, repeats: int, settle_s: float = 0.0) -> dict:
  """Median wall time (s) of each blocking `fn()`, timed round-robin so that load from other
  processes on a shared machine hits every contender alike.

  `settle_s`: busy-wait this long before each timed call, so that threads a contender leaves
  spinning (PyTorch's OpenMP workers spin ~10-20 ms after each parallel region) do not take cores
  from the next one. It matters for calls of a few ms; busy, not asleep, so no CPU idles down.
  """
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      until = time.perf_counter() + settle_s
      while time.perf_counter() < until:
        pass
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
