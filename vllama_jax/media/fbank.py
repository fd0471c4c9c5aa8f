"""Kaldi log-mel filterbank as `torchaudio.compliance.kaldi.fbank` computes it: per-frame loops
compiled with Numba (already installed with librosa), NumPy's FFT between them.

Only the options ImageBind uses are supported: `htk_compat=True, use_energy=False,
window_type='hanning', dither=0.0, snip_edges=True`, 25 ms frames with a 10 ms shift, power
spectrum, low_freq 20 Hz, high_freq = Nyquist, no VTLN.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

EPSILON = float(np.finfo(np.float32).eps)  # Kaldi's floor before the log: 1.1920929e-07
PREEMPHASIS = 0.97


def _next_power_of_2(x: int) -> int:
  return 1 if x == 0 else 2 ** (x - 1).bit_length()


def _mel(f):
  return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
              high_freq: float = 0.0) -> np.ndarray:
  """Kaldi triangular mel filters as torchaudio's `get_mel_banks` builds them, with its zero
  column for the Nyquist bin appended: (padded_window // 2 + 1, num_bins) float32."""
  nyquist = 0.5 * sample_rate
  if high_freq <= 0.0:
    high_freq += nyquist
  if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
    raise ValueError(f"bad mel range [{low_freq}, {high_freq}] for Nyquist {nyquist}")
  # torchaudio computes the edges in float32 from float64 scalars; doing the same keeps which
  # FFT bins fall inside each triangle identical (bins that catch none stay all zero, as there).
  f32 = np.float32
  mel_low, mel_high = float(_mel(low_freq)), float(_mel(high_freq))
  delta = (mel_high - mel_low) / (num_bins + 1)
  b = np.arange(num_bins, dtype=f32)[:, None]
  left = f32(mel_low) + b * f32(delta)
  center = f32(mel_low) + (b + f32(1)) * f32(delta)
  right = f32(mel_low) + (b + f32(2)) * f32(delta)
  fft_freqs = f32(sample_rate / padded_window) * np.arange(padded_window // 2, dtype=f32)
  mel = (f32(1127.0) * np.log(f32(1.0) + fft_freqs / f32(700.0)))[None, :]
  up = (mel - left) / (center - left)
  down = (right - mel) / (right - center)
  bins = np.maximum(f32(0), np.minimum(up, down))
  bins = np.concatenate([bins, np.zeros((num_bins, 1), f32)], axis=1)
  bins = np.ascontiguousarray(bins.T)
  bins.setflags(write=False)
  return bins


@functools.lru_cache(maxsize=16)
def _hann(n: int) -> np.ndarray:
  # torch.hann_window(n, periodic=False): 0.5 - 0.5 cos(2 pi k / (n - 1)); exactly 0 at k = 0.
  w = (0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(n) / (n - 1)))
  w.setflags(write=False)
  return w


def frame_count(num_samples: int, sample_rate: int = 16000, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0) -> int:
  """Frames `kaldi_fbank` returns for `num_samples` (snip_edges: only whole frames)."""
  size = int(sample_rate * frame_length_ms * 0.001)
  shift = int(sample_rate * frame_shift_ms * 0.001)
  return 0 if num_samples < size else 1 + (num_samples - size) // shift


@functools.lru_cache(maxsize=16)
def _mel_rows(num_bins: int, padded_window: int, sample_rate: float):
  """`mel_banks` as rows of its non-zero run: (first bin, last bin + 1, float64 weights padded
  to the widest run), one row per mel bin. The banks are ~99% zeros."""
  banks = mel_banks(num_bins, padded_window, sample_rate).T
  lo = np.zeros(num_bins, np.int64)
  hi = np.zeros(num_bins, np.int64)
  for m, row in enumerate(banks):
    nonzero = np.flatnonzero(row)
    if nonzero.size:
      lo[m], hi[m] = nonzero[0], nonzero[-1] + 1
  weights = np.zeros((num_bins, max(1, int((hi - lo).max()))))
  for m in range(num_bins):
    weights[m, :hi[m] - lo[m]] = banks[m, lo[m]:hi[m]]
  return lo, hi, weights


# `reassoc` lets LLVM vectorise the frame sums (float64, so the order does not matter here).
@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _windowed_frames(x, first, count, size, shift, window, padded):  # pragma: no cover (compiled)
  """Frames first .. first + count of x: DC removed, pre-emphasised (the first sample against
  itself: Kaldi's replicate padding), windowed, into padded[:count, :size]."""
  for i in range(count):
    start = (first + i) * shift
    mean = 0.0
    for j in range(size):
      mean += x[start + j]
    mean /= size
    padded[i, 0] = (1.0 - PREEMPHASIS) * (x[start] - mean) * window[0]
    for j in range(1, size):
      padded[i, j] = ((x[start + j] - mean) - PREEMPHASIS * (x[start + j - 1] - mean)) * window[j]


@numba.njit(nogil=True, cache=True)
def _mel_power(spec, count, lo, hi, weights, out):  # pragma: no cover (compiled)
  """Mel power of the first count spectra, floored at Kaldi's epsilon, into out[:count]."""
  power = np.empty(spec.shape[1])
  for i in range(count):
    for b in range(spec.shape[1]):
      power[b] = spec[i, b].real * spec[i, b].real + spec[i, b].imag * spec[i, b].imag
    for m in range(out.shape[1]):
      total = 0.0
      for b in range(lo[m], hi[m]):
        total += power[b] * weights[m, b - lo[m]]
      out[i, m] = max(total, EPSILON)


class _Workspace(threading.local):
  """Per-thread frame and spectrum buffers, reused across calls: fresh multi-MB temporaries
  per call cost more in page faults than the FFT itself."""

  def __init__(self):
    self.key, self.buffers = None, None

  def get(self, frames: int, size: int, nfft: int):
    if self.key != (frames, size, nfft):
      self.key = (frames, size, nfft)
      # Frames fill [:size] of each row; the zero tail past it is never written, so it stays zero.
      self.buffers = np.zeros((frames, nfft)), np.empty((frames, nfft // 2 + 1), np.complex128)
    return self.buffers


_WORKSPACE = _Workspace()


def _fbank_blocks(x: np.ndarray, out: np.ndarray, blocks, size: int, shift: int, nfft: int, mel,
                  block: int) -> None:
  """Log-mel of each block (row, first frame, frame count) of x (rows, samples) into out (rows,
  frames, mels), in float64 buffers of `block` frames that stay in cache."""
  padded, spec = _WORKSPACE.get(block, size, nfft)
  window = _hann(size)
  for r, first, count in blocks:
    _windowed_frames(x[r], first, count, size, shift, window, padded)
    np.fft.rfft(padded[:count], axis=-1, out=spec[:count])
    _mel_power(spec, count, *mel, out[r, first:first + count])
    np.log(out[r, first:first + count], out=out[r, first:first + count])


_POOLS: dict[int, ThreadPoolExecutor] = {}  # by helper count; a forked child starts its own
os.register_at_fork(after_in_child=_POOLS.clear)


def _default_threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run(jobs: list, threads: int) -> None:
  """Runs each job (a `_fbank_blocks` argument tuple) on `threads` threads; the compiled loops and
  NumPy's FFT release the GIL, so the jobs run in parallel."""
  threads = min(threads, len(jobs))
  if threads <= 1:
    for job in jobs:
      _fbank_blocks(*job)
    return
  helpers = threads - 1  # the calling thread takes the first job itself instead of waiting idle
  if helpers not in _POOLS:
    _POOLS[helpers] = ThreadPoolExecutor(helpers, thread_name_prefix="kaldi_fbank")
  pending = [_POOLS[helpers].submit(_fbank_blocks, *job) for job in jobs[1:]]
  _fbank_blocks(*jobs[0])
  for job in pending:
    job.result()


def kaldi_fbank(waveform: np.ndarray, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                block_frames: int = 128, threads: int | None = None) -> np.ndarray:
  """Log-mel filterbank of a 1-D waveform, or of each row of a (..., samples) batch.

  Returns (..., frames, num_mel_bins) float32. Framing, FFT and mel sums are float64 and the mel
  power is rounded once before the log, so it agrees with torchaudio's float32 result to float32
  rounding except where torchaudio's own float32 noise floor dominates (bins ~1e-7 of the frame's
  peak power). Frames go in blocks of at most `block_frames`, whose float64 buffers stay in cache,
  on `threads` threads (default: one per CPU this process may use, as torch's intra-op threads).
  The first call in a process compiles two small kernels (~2 s; cached on disk after that).
  """
  size = int(sample_rate * frame_length_ms * 0.001)
  shift = int(sample_rate * frame_shift_ms * 0.001)
  nfft = _next_power_of_2(size)
  if not 2 <= size:
    raise ValueError(f"frame of {size} samples is too short")
  x = np.asarray(waveform)
  x = np.ascontiguousarray(x, x.dtype if x.dtype in (np.float32, np.float64) else np.float64)
  lead, n = x.shape[:-1], x.shape[-1]
  x = x.reshape(-1, n)
  frames = frame_count(n, sample_rate, frame_length_ms, frame_shift_ms)
  out = np.empty((x.shape[0], frames, num_mel_bins), np.float32)
  mel = _mel_rows(num_mel_bins, nfft, float(sample_rate))
  threads = _default_threads() if threads is None else threads
  blocks = [(r, f, min(block_frames, frames - f)) for r in range(x.shape[0])
            for f in range(0, frames, block_frames)]
  step = max(1, -(-len(blocks) // max(1, threads)))  # one job of consecutive blocks per thread
  jobs = [(x, out, blocks[b:b + step], size, shift, nfft, mel, block_frames)
          for b in range(0, len(blocks), step)]
  _run(jobs, threads)
  return out.reshape(lead + (frames, num_mel_bins))
