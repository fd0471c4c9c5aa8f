"""Kaldi log-mel filterbank as `torchaudio.compliance.kaldi.fbank` computes it, in NumPy.

Only the options ImageBind uses are supported: `htk_compat=True, use_energy=False,
window_type='hanning', dither=0.0, snip_edges=True`, 25 ms frames with a 10 ms shift, power
spectrum, low_freq 20 Hz, high_freq = Nyquist, no VTLN.
"""

from __future__ import annotations

import functools
import math

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
  # torch.hann_window(n, periodic=False): 0.5 - 0.5 cos(2 pi k / (n - 1)).
  w = (0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(n) / (n - 1)))
  w.setflags(write=False)
  return w


def frame_count(num_samples: int, sample_rate: int = 16000, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0) -> int:
  """Frames `kaldi_fbank` returns for `num_samples` (snip_edges: only whole frames)."""
  size = int(sample_rate * frame_length_ms * 0.001)
  shift = int(sample_rate * frame_shift_ms * 0.001)
  return 0 if num_samples < size else 1 + (num_samples - size) // shift


def kaldi_fbank(waveform: np.ndarray, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> np.ndarray:
  """Log-mel filterbank of a 1-D waveform, or of each row of a (clips, samples) batch.

  Returns (..., frames, num_mel_bins) float32. Computed in float64 and rounded once at the end,
  so it agrees with torchaudio's float32 result to float32 rounding except where torchaudio's own
  float32 noise floor dominates (bins ~1e-7 of the frame's peak power).
  """
  x = np.asarray(waveform, np.float64)
  size = int(sample_rate * frame_length_ms * 0.001)
  shift = int(sample_rate * frame_shift_ms * 0.001)
  nfft = _next_power_of_2(size)
  if not 2 <= size:
    raise ValueError(f"frame of {size} samples is too short")
  if x.shape[-1] < size:
    return np.zeros(x.shape[:-1] + (0, num_mel_bins), np.float32)
  # Pre-emphasis commutes with the per-frame DC removal except for a constant: with frame mean m,
  # preemph(x - m)[j] = preemph(x)[j] - 0.03 m. Inside a frame preemph(x)[j] = x[j] - 0.97 x[j-1]
  # for j >= 1 (shared by all frames, computed once) and 0.03 x[0] for j = 0 (replicate padding).
  y = x.copy()
  y[..., 1:] -= PREEMPHASIS * x[..., :-1]
  frames_x = np.lib.stride_tricks.sliding_window_view(x, size, axis=-1)[..., ::shift, :]
  frames = np.lib.stride_tricks.sliding_window_view(y, size, axis=-1)[..., ::shift, :].copy()
  frames[..., 0] = (1.0 - PREEMPHASIS) * frames_x[..., 0]
  frames -= (1.0 - PREEMPHASIS) * frames_x.mean(axis=-1, keepdims=True)
  frames *= _hann(size)
  spec = np.fft.rfft(frames, n=nfft, axis=-1)
  # Past the FFT all terms are non-negative sums, so float32 costs no accuracy that matters.
  power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
  energies = power @ mel_banks(num_mel_bins, nfft, float(sample_rate))
  return np.log(np.maximum(energies, EPSILON)).astype(np.float32)
