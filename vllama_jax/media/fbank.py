"""Kaldi log-mel filterbank as `torchaudio.compliance.kaldi.fbank` computes it, in NumPy.

Only the options ImageBind uses are supported: `htk_compat=True, use_energy=False,
window_type='hanning', dither=0.0, snip_edges=True`, 25 ms frames with a 10 ms shift, power
spectrum, low_freq 20 Hz, high_freq = Nyquist, no VTLN.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

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
def _mel_blocks(num_bins: int, padded_window: int, sample_rate: float, groups: int = 8):
  """`mel_banks` cut into `groups` column groups, each with only the FFT-bin rows its triangles
  touch: ((mel slice, bin slice, weights), ...). The banks are ~99% zeros, so the matmuls over
  these bands cost ~5x less than the dense one and add the same non-zero products."""
  banks = mel_banks(num_bins, padded_window, sample_rate)
  step = -(-num_bins // groups)
  bands = []
  for m in range(0, num_bins, step):
    cols = banks[:, m:m + step]
    rows = np.flatnonzero(cols.any(axis=1))
    lo, hi = (rows[0], rows[-1] + 1) if rows.size else (0, 1)
    weights = np.ascontiguousarray(cols[lo:hi])
    weights.setflags(write=False)
    bands.append((slice(m, m + cols.shape[1]), slice(lo, hi), weights))
  return tuple(bands)


def _blocks(rows: int, frames: int, target: int):
  """(row slice, frame slice) blocks of about `target` frames (whole rows where they fit)."""
  per_block = max(1, target // frames)
  step = min(frames, target)
  for r in range(0, rows, per_block):
    for f in range(0, frames, step):
      yield slice(r, min(r + per_block, rows)), slice(f, min(f + step, frames))


def _fbank_block(x: np.ndarray, out: np.ndarray, size: int, shift: int, nfft: int, bands) -> None:
  """Log-mel of the whole frames of x (rows, samples) into out (rows, frames, mels)."""
  x = np.asarray(x, np.float64)
  # Pre-emphasis commutes with the per-frame DC removal except for a constant: with frame mean m,
  # preemph(x - m)[j] = preemph(x)[j] - 0.03 m for j >= 1, where preemph(x)[j] = x[j] - 0.97 x[j-1]
  # is shared by all frames and computed once. Sample j = 0 of each frame (replicate padding:
  # 0.03 (x[0] - m)) is left wrong: the Hann window is exactly 0 there.
  y = np.empty_like(x)
  y[:, 0] = x[:, 0]
  np.subtract(x[:, 1:], PREEMPHASIS * x[:, :-1], out=y[:, 1:])
  frames_x = np.lib.stride_tricks.sliding_window_view(x, size, axis=-1)[:, ::shift]
  frames_y = np.lib.stride_tricks.sliding_window_view(y, size, axis=-1)[:, ::shift]
  padded = np.zeros(frames_y.shape[:2] + (nfft,))
  framed = padded[..., :size]
  np.subtract(frames_y, (1.0 - PREEMPHASIS) * frames_x.mean(axis=-1, keepdims=True), out=framed)
  framed *= _hann(size)
  # Past the FFT all terms are non-negative sums, so float32 costs no accuracy that matters.
  spec = np.fft.rfft(padded, axis=-1).astype(np.complex64)
  power = spec.real ** 2
  power += spec.imag ** 2
  for mels, bins, weights in bands:
    np.matmul(power[..., bins], weights, out=out[..., mels])
  np.log(np.maximum(out, EPSILON, out=out), out=out)


_POOLS: dict[int, ThreadPoolExecutor] = {}  # by thread count; a forked child starts its own
os.register_at_fork(after_in_child=_POOLS.clear)


def _default_threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run(jobs: list, threads: int) -> None:
  """Runs each job (a `_fbank_block` argument tuple) on `threads` threads; NumPy's element-wise
  loops, FFT and BLAS release the GIL, so the blocks run in parallel."""
  threads = min(threads, len(jobs))
  if threads <= 1:
    for job in jobs:
      _fbank_block(*job)
    return
  if threads not in _POOLS:
    _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="kaldi_fbank")
  for _ in _POOLS[threads].map(lambda job: _fbank_block(*job), jobs):
    pass


def kaldi_fbank(waveform: np.ndarray, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                block_frames: int = 400, threads: int | None = None) -> np.ndarray:
  """Log-mel filterbank of a 1-D waveform, or of each row of a (..., samples) batch.

  Returns (..., frames, num_mel_bins) float32. Framing and FFT are float64 and the power spectrum
  is rounded once after it, so it agrees with torchaudio's float32 result to float32 rounding
  except where torchaudio's own float32 noise floor dominates (bins ~1e-7 of the frame's peak
  power). Frames go in blocks of about `block_frames`, whose float64 buffers stay in cache, on
  `threads` threads (default: one per CPU this process may use, as torch's intra-op threads).
  """
  size = int(sample_rate * frame_length_ms * 0.001)
  shift = int(sample_rate * frame_shift_ms * 0.001)
  nfft = _next_power_of_2(size)
  if not 2 <= size:
    raise ValueError(f"frame of {size} samples is too short")
  x = np.asarray(waveform)
  lead, n = x.shape[:-1], x.shape[-1]
  x = x.reshape(-1, n)
  frames = frame_count(n, sample_rate, frame_length_ms, frame_shift_ms)
  out = np.empty((x.shape[0], frames, num_mel_bins), np.float32)
  bands = _mel_blocks(num_mel_bins, nfft, float(sample_rate))
  jobs = [(x[r, f.start * shift:(f.stop - 1) * shift + size], out[r, f], size, shift, nfft, bands)
          for r, f in _blocks(x.shape[0], frames, block_frames)] if frames else []
  _run(jobs, _default_threads() if threads is None else threads)
  return out.reshape(lead + (frames, num_mel_bins))
