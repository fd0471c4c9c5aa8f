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

# Dense peak FLOP/s per chip for the MFU estimate (bf16 where the chip has it).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float:
  """The table's value for the device kind, or, on CPU, a measured float32 matmul rate."""
  device = device or jax.devices()[0]
  for kind, flops in PEAK_FLOPS.items():
    if device.device_kind.startswith(kind):
      return flops
  if device.platform != "cpu":
    return float("nan")
  n = 1024
  x = jax.numpy.ones((n, n), jax.numpy.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  start, reps = time.perf_counter(), 8
  for _ in range(reps):
    y = matmul(x)
  y.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - start)


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
