"""Seeing a run: a progress bar, JSONL and TensorBoard metrics, and an MFU estimate. Only process 0
of a multi-host run writes or prints."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
import tensorboardX

from vllama_jax.convert.output import free_name, write_atomically

# Dense bf16 peak FLOP/s of one JAX device, by its exact `device_kind`. A TPU v2 or v3 chip is two
# devices (one per TensorCore); from v4 on, a device is a chip. "TPU v5" is v5p.
TPU_PEAK_FLOPS = {
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
# NVIDIA kinds carry the memory and form factor ("NVIDIA H100 80GB HBM3" is the SXM part,
# "NVIDIA A100-SXM4-40GB"): the longest prefix that ends the kind or a word of it wins.
GPU_PEAK_FLOPS = {
    "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200": 989e12,
}


def peak_flops_of_kind(kind: str) -> float | None:
  """The tables' peak for a device kind; None for a kind they lack."""
  if kind in TPU_PEAK_FLOPS:
    return TPU_PEAK_FLOPS[kind]
  prefixes = [p for p in GPU_PEAK_FLOPS if kind.startswith(p) and kind[len(p):][:1] in ("", " ", "-")]
  return GPU_PEAK_FLOPS[max(prefixes, key=len)] if prefixes else None


def peak_flops(devices=None) -> float:
  """Peak FLOP/s of `devices` together (default: all), for the MFU estimate: the tables' value
  times their number; NaN for an accelerator the tables lack. CPU devices share their host's cores
  (`--xla_force_host_platform_device_count` splits no hardware), so their peak is one measured
  float32 matmul rate per process, however many devices each has."""
  devices = jax.devices() if devices is None else devices
  kind, platform = devices[0].device_kind, devices[0].platform
  if platform != "cpu":
    each = peak_flops_of_kind(kind)
    return float("nan") if each is None else each * len(devices)
  n = 1024
  x = jax.device_put(jax.numpy.ones((n, n), jax.numpy.float32), jax.local_devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  start, reps = time.perf_counter(), 8
  for _ in range(reps):
    y = matmul(x)
  y.block_until_ready()
  rate = 2 * n ** 3 * reps / (time.perf_counter() - start)
  return rate * len({getattr(d, "process_index", 0) for d in devices})


class MetricsLog:
  """Appends one JSON object per record to `workdir/metrics.jsonl` and mirrors its finite scalars
  to TensorBoard event files in `workdir/tensorboard`.

  Resumed at `resume_step`, it drops the records of later steps (those steps run again) and has
  TensorBoard hide them; a fresh start (`resume_step=None`) moves an earlier run's logs aside.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self._file = self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path, board = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tensorboard")
    if resume_step is None:
      for earlier in (path, board):
        if os.path.exists(earlier):
          root, ext = os.path.splitext(earlier)
          os.rename(earlier, free_name(f"{root}-previous{ext}"))
    elif os.path.isfile(path):
      _keep_records_up_to(path, resume_step)
    self._file = open(path, "a")
    self._tb = tensorboardX.SummaryWriter(board, purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in values.items()}
    self._file.write(json.dumps({"step": step, "split": split, "time": round(time.time(), 3), **clean}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _keep_records_up_to(path: str, step: int) -> None:
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      keep = json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
      keep = False  # a line cut short when the run was killed
    if keep:
      kept.append(line if line.endswith("\n") else line + "\n")
  write_atomically(path, "".join(kept))


def _plain(v):
  if isinstance(v, (np.generic, jax.Array)):
    v = np.asarray(v).item()
  return v


class Progress:
  """A tqdm bar over the run's steps showing loss, learning rate, samples/s, tokens/s and MFU."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    from tqdm import tqdm
    self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                    disable=not enabled, smoothing=0.1)

  def update(self, steps: int, **shown) -> None:
    self.bar.set_postfix({k: _fmt(v) for k, v in shown.items()}, refresh=False)
    self.bar.update(steps)

  def write(self, text: str) -> None:
    self.bar.write(text, file=sys.stderr)

  def close(self) -> None:
    self.bar.close()


def _fmt(v) -> str:
  v = _plain(v)
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
  return str(v)
