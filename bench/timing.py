"""Timing shared by the benchmarks, and the torch device they compare against."""

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


def synced(fn, device):
  """`fn`, returning only once `device` (a torch.device) has finished what it queued: torch's CUDA
  calls are asynchronous. On a CPU, `fn` itself."""
  if device.type != "cuda":
    return fn
  import torch

  def call():
    out = fn()
    torch.cuda.synchronize(device)
    return out
  return call


def torch_device(choice: str):
  """The torch.device for `--device` `choice`; "auto": cuda where JAX's default backend is a GPU and
  torch sees one. On cuda, fp32 matmuls become full fp32 on both sides, as on a CPU: JAX's default
  precision would run them as TF32, torch's does not."""
  import jax
  import torch

  if choice == "auto":
    choice = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  if choice == "cuda":
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  return torch.device(choice)


def torch_where(device) -> str:
  """Where torch runs, for a benchmark's header: the GPU's name, or the CPU threads it uses."""
  import torch

  return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
