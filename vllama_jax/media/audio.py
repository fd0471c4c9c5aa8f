"""Audio preprocessing of Video-LLaMA's audio branch: ImageBind's `load_and_transform_audio_data`.

Decode the first audio stream with PyAV, resample to 16 kHz, cut `num_clips` clips of 2 s spaced as
pytorchvideo's `ConstantClipsPerVideoSampler`, subtract each clip's mean in place on the shared
buffer, Kaldi log-mel filterbank of channel 0, pad/crop to 204 frames and normalise.

Resampling is a NumPy port of the reference's `torchaudio.functional.resample` (windowed sinc, Hann,
lowpass width 6, rolloff 0.99), output length ceil(n * new / old). soxr HQ (librosa's "soxr_hq")
is offered as `resampler="soxr"`, but its sharper filter removes most energy above ~7.3 kHz, moving
the top ~12 mel bins by up to ~0.7 in normalised units against the reference.
"""

from __future__ import annotations

import functools
import math
import os
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from vllama_jax.media import MediaError
from vllama_jax.media.fbank import kaldi_fbank

AUDIO_MEAN, AUDIO_STD = -4.268, 9.138  # ImageBind's normalisation of the log-mel features
TARGET_FRAMES = 204


class Waveform(NamedTuple):
  """Decoded audio: float32 (channels, samples) in [-1, 1], and its sample rate in Hz."""
  samples: np.ndarray
  sample_rate: int

  @property
  def duration(self) -> float:
    return self.samples.shape[1] / self.sample_rate


_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0 ** 31, "s64": 2.0 ** 63}


def _frame_array(frame) -> np.ndarray:
  """One decoded frame as float32 (channels, samples), scaled as torchaudio.load normalises."""
  fmt = frame.format.name
  channels = len(frame.layout.channels)
  a = frame.to_ndarray()
  if not frame.format.is_planar:
    a = a.reshape(-1, channels).T
  base = fmt.rstrip("p")
  if base == "u8":
    return ((a.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
  if base in _INT_SCALE:
    return (a.astype(np.float64) / _INT_SCALE[base]).astype(np.float32)
  return a.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99):
  """torchaudio's `_get_sinc_resample_kernel` (sinc_interp_hann) for rates already divided by
  their gcd: (kernel_size, new) float64 and the padding width."""
  base = min(orig, new) * rolloff
  width = math.ceil(lowpass_filter_width * orig / base)
  idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
  t = (np.arange(0, -new, -1, dtype=np.float64)[:, None] / new + idx) * base
  t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
  window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
  t *= math.pi
  with np.errstate(invalid="ignore", divide="ignore"):
    kernel = np.where(t == 0, 1.0, np.sin(t) / t)
  kernel = kernel * window * (base / orig)
  kernel = np.ascontiguousarray(kernel.T)
  kernel.setflags(write=False)
  return kernel, width


def resample(samples: np.ndarray, orig_rate: int, new_rate: int,
             method: str = "sinc") -> np.ndarray:
  """Resample float (channels, samples) to ceil(n * new / orig) samples.

  `method="sinc"` (default) is `torchaudio.functional.resample` with its defaults (windowed sinc,
  Hann, lowpass width 6, rolloff 0.99), ported to NumPy, so features match ImageBind's. "soxr" is
  soxr at HQ quality (librosa's "soxr_hq"): a sharper anti-aliasing filter whose passband ends
  near 0.91 of the new Nyquist frequency, so the top ~12 of 128 mel bins (above ~7.2 kHz) come out
  much weaker than in the reference.
  """
  samples = np.asarray(samples, np.float32)
  if orig_rate == new_rate:
    return samples
  orig_rate, new_rate = int(orig_rate), int(new_rate)
  n = samples.shape[1]
  g = math.gcd(orig_rate, new_rate)
  orig, new = orig_rate // g, new_rate // g
  target = math.ceil(new * n / orig)
  if method == "soxr":
    import soxr  # a dependency of librosa
    out = soxr.resample(samples.T, orig_rate, new_rate, quality="HQ").T
    out = np.pad(out, ((0, 0), (0, max(target - out.shape[1], 0))))
  elif method == "sinc":
    kernel, width = _sinc_kernel(orig, new)
    x = np.pad(samples.astype(np.float64), ((0, 0), (width, width + orig)))
    blocks = np.lib.stride_tricks.sliding_window_view(x, kernel.shape[0], axis=-1)[:, ::orig]
    # Output sample i * new + j is block i (input from i * orig - width) times kernel phase j.
    out = (blocks @ kernel).reshape(samples.shape[0], -1)
  else:
    raise ValueError(f"unknown resampling method {method!r}: expected 'sinc' or 'soxr'")
  return np.ascontiguousarray(out[:, :target], np.float32)


def load_audio(path, sample_rate: int | None = 16000, resampler: str = "sinc") -> Waveform | None:
  """The first audio stream of any file FFmpeg reads, resampled to `sample_rate` (None: keep).

  Returns None when the file has no audio stream (a silent video), so the caller can go on with
  video only. Raises MediaError when the file is missing or cannot be decoded.
  """
  import av
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MediaError(f"{path}: no such media file")
  try:
    with av.open(path) as container:
      if not container.streams.audio:
        return None
      stream = container.streams.audio[0]
      chunks = [_frame_array(f) for f in container.decode(stream)]
      rate = stream.codec_context.sample_rate or stream.rate
  except av.error.FFmpegError as e:
    raise MediaError(f"{path}: cannot decode audio ({e})") from e
  if not chunks:
    raise MediaError(f"{path}: the audio stream holds no decodable samples")
  samples = np.concatenate(chunks, axis=1)
  if sample_rate is not None and rate != sample_rate:
    samples, rate = resample(samples, rate, sample_rate, resampler), sample_rate
  return Waveform(samples, int(rate))


def clip_bounds(duration: float, num_clips: int = 8, clip_seconds: float = 2.0,
                spacing_divisor: int | None = None) -> list[tuple[Fraction, Fraction]]:
  """(start, end) seconds of each clip, as ImageBind's `get_clip_timepoints` gets them from
  pytorchvideo's ConstantClipsPerVideoSampler.

  Clip k starts at k * max(duration - clip_seconds, 0) / spacing_divisor: pytorchvideo 0.1.5 (the
  default) divides by `num_clips`, later releases by `num_clips - 1` (pass spacing_divisor=7).
  """
  divisor = num_clips if spacing_divisor is None else spacing_divisor
  # The subtraction is float, as in pytorchvideo; everything after it is exact Fractions.
  max_start = Fraction(max(duration - clip_seconds, 0))
  step = Fraction(max_start, divisor)
  bounds = []
  for k in range(num_clips):
    start = step * k
    bounds.append((start, start + Fraction(clip_seconds)))
    if step * (k + 1) > max_start:  # pytorchvideo stops early once a start would pass the end
      break
  return bounds


def sample_clips(waveform: Waveform, num_clips: int = 8, clip_seconds: float = 2.0,
                 spacing_divisor: int | None = None) -> list[np.ndarray]:
  """Channel 0 of each clip after ImageBind's in-place mean subtraction.

  ImageBind does `clip -= clip.mean()` on views of one buffer, clip after clip, with the mean over
  all channels; overlapping clips (duration < 18 s for 8 clips) therefore see the samples already
  shifted by the earlier clips' means. This replays that on a copy.
  """
  buffer = np.array(waveform.samples, np.float32, copy=True)
  rate = waveform.sample_rate
  clips = []
  for start, end in clip_bounds(waveform.duration, num_clips, clip_seconds, spacing_divisor):
    view = buffer[:, int(start * rate):int(end * rate)]
    if view.size:
      view -= np.float32(view.mean(dtype=np.float64))
    clips.append(view[0].copy())
  return clips


def audio_features(source, num_clips: int = 8, clip_seconds: float = 2.0,
                   spacing_divisor: int | None = None, num_mel_bins: int = 128,
                   target_frames: int = TARGET_FRAMES, sample_rate: int = 16000,
                   mean: float = AUDIO_MEAN, std: float = AUDIO_STD,
                   resampler: str = "sinc") -> np.ndarray | None:
  """ImageBind audio input of one file or Waveform: (num_clips, 1, num_mel_bins, target_frames)
  float32 (the 1 is ImageBind's image-like channel axis; stack videos in front for its
  (B, clips, 1, mel, frames) input). None when a file has no audio stream.

  Clips shorter than one 25 ms frame give an all-zero filterbank before normalisation (ImageBind
  itself fails on them).
  """
  if isinstance(source, Waveform):
    waveform = source
    if waveform.sample_rate != sample_rate:
      samples = resample(waveform.samples, waveform.sample_rate, sample_rate, resampler)
      waveform = Waveform(samples, sample_rate)
  else:
    waveform = load_audio(source, sample_rate, resampler)
    if waveform is None:
      return None
  clips = sample_clips(waveform, num_clips, clip_seconds, spacing_divisor)
  out = np.zeros((len(clips), 1, num_mel_bins, target_frames), np.float32)
  lengths = [len(c) for c in clips]
  for length in set(lengths):  # all clips have one length unless the audio is short
    idx = [i for i, n in enumerate(lengths) if n == length]
    fb = kaldi_fbank(np.stack([clips[i] for i in idx]), sample_rate, num_mel_bins)
    n = min(fb.shape[1], target_frames)
    out[idx, 0, :, :n] = fb[:, :n].transpose(0, 2, 1)
  out -= np.float32(mean)
  out /= np.float32(std)
  return out
