"""Audio preprocessing vs torchaudio's Kaldi fbank, the installed ImageBind's
`load_and_transform_audio_data` (imagebind-unofficial with pytorchvideo 0.1.5, its torchaudio.load
pointed at our decoded waveform), and a literal torch replay of it (torchaudio resample, the clip
sampler with divisor 8 or 7, in-place mean subtraction on views, fbank of channel 0, pad/crop to 204,
Normalize(-4.268, 9.138)) for what the installed release cannot do: the later divisor, raw clips."""

import os
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(__file__))
from imagebind_reference import imagebind_data  # noqa: E402
from media_fixtures import decode, tone_mix, write_media  # noqa: E402

from vllama_jax.media import (MediaError, Waveform, audio_features, clip_bounds,  # noqa: E402
                              kaldi_fbank, load_audio, resample, sample_clips)
from vllama_jax.media.fbank import mel_banks  # noqa: E402

import torchaudio  # noqa: E402  (setup.sh installs its pure-Python parts)
from torchaudio.compliance import kaldi  # noqa: E402

EPS_LOG = np.log(np.float32(np.finfo(np.float32).eps))


def ref_fbank(x, dtype=torch.float32):
  """torchaudio's kaldi.fbank with ImageBind's options; x: (samples,) or (channels, samples)."""
  x = torch.as_tensor(np.atleast_2d(x)).to(dtype)
  return kaldi.fbank(x, htk_compat=True, sample_frequency=16000, use_energy=False,
                     window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25,
                     frame_shift=10).double().numpy()


class RefClipSampler:
  """pytorchvideo's ConstantClipsPerVideoSampler (0.1.5: divisor clips_per_video; later
  releases: clips_per_video - 1), stateful as ImageBind drives it."""

  def __init__(self, clip_duration, clips_per_video, divisor):
    self.d, self.n, self.div, self.i = clip_duration, clips_per_video, divisor, 0

  def __call__(self, last_clip_time, video_duration):
    max_start = Fraction(max(video_duration - self.d, 0))
    uniform = Fraction(max_start, self.div)
    start = uniform * self.i
    self.i += 1
    last = self.i >= self.n or uniform * self.i > max_start
    if last:
      self.i = 0
    return start, start + self.d, last


def ref_timepoints(duration, divisor=8):
  sampler, out, last, end = RefClipSampler(2, 8, divisor), [], False, 0.0
  while not last:
    start, end, last = sampler(end, duration)
    out.append((start, end))
  return out


def ref_features(samples, rate, divisor=8, return_clips=False):
  """ImageBind's load_and_transform_audio_data on an already decoded waveform, in torch."""
  waveform = torch.from_numpy(np.array(samples, np.float32))
  if rate != 16000:
    waveform = torchaudio.functional.resample(waveform, orig_freq=rate, new_freq=16000)
  clips, raw = [], []
  for start, end in ref_timepoints(waveform.size(1) / 16000, divisor):
    clip = waveform[:, int(start * 16000):int(end * 16000)]
    clip -= clip.mean()  # in place on a view of the shared buffer
    raw.append(clip[0].clone().numpy())
    fb = torch.from_numpy(ref_fbank(clip)).float().transpose(0, 1)
    p = 204 - fb.size(1)
    fb = torch.nn.functional.pad(fb, (0, p)) if p > 0 else fb[:, :204]
    clips.append(((fb.unsqueeze(0) - (-4.268)) / 9.138))
  feats = torch.stack(clips).numpy()
  return (feats, raw) if return_clips else feats


# -- Filterbank ----------------------------------------------------------------------------------

def _signal(kind, rate, seconds=1.5, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  nyq = rate / 2
  if kind == "tone":
    x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * min(3000, 0.7 * nyq) * t)
  elif kind == "noise":
    x = 0.1 * rng.standard_normal(t.shape)
  elif kind == "chirp":
    f1 = 0.9 * nyq
    x = 0.3 * np.sin(2 * np.pi * (50 * t + (f1 - 50) / (2 * seconds) * t ** 2))
  elif kind == "silence":
    x = np.zeros_like(t)
  else:
    x = tone_mix(seconds, rate, 1, seed)[0]
  return x.astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("kind", ["tone", "noise", "chirp", "silence", "speech"])
def test_fbank_matches_torchaudio(kind, rate):
  x = _signal(kind, rate)
  if rate != 16000:  # the same 16 kHz waveform goes to both sides
    x = torchaudio.functional.resample(torch.from_numpy(x), rate, 16000).numpy()
  ours = kaldi_fbank(x).astype(np.float64)
  t32, t64 = ref_fbank(x), ref_fbank(x, torch.float64)
  assert ours.shape == t32.shape == (1 + (len(x) - 400) // 160, 128)
  # We compute in float64: within 1e-3 of the exact computation everywhere. torchaudio's float32
  # FFT has a noise floor near 1e-7 of a frame's total power; in leakage bins of tones and chirps
  # that moves its log-mel by up to ~5e-3, so against float32 the bound adds torchaudio's own error.
  assert np.abs(ours - t64).max() <= 1e-3
  assert np.all(np.abs(ours - t32) <= np.abs(t32 - t64) + 1e-3)
  # Where no bin sits at that floor, plainly within 1e-3 of torchaudio's float32 output. (Speech
  # from 8 kHz has nothing above 4 kHz once upsampled, so half its bins are at the floor.)
  if kind in ("noise", "silence") or (kind == "speech" and rate >= 16000):
    assert np.abs(ours - t32).max() <= 1e-3
  if kind == "silence":
    assert np.all(ours == EPS_LOG) and np.all(t32 == EPS_LOG)


def test_mel_banks_match_torchaudio():
  ref, _ = kaldi.get_mel_banks(128, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
  ours = mel_banks(128, 512, 16000.0)
  assert ours.shape == (257, 128) and np.all(ours[256] == 0)
  np.testing.assert_allclose(ours[:256].T, ref.numpy(), atol=1e-4)
  # Mel bin 3 catches no FFT bin at 16 kHz / 512: log(eps) there, on both sides.
  empty_ours, empty_ref = np.flatnonzero(ours.sum(0) == 0), np.flatnonzero(ref.sum(1) == 0)
  assert empty_ours.tolist() == empty_ref.tolist() == [3]
  x = _signal("noise", 16000)
  assert np.all(kaldi_fbank(x)[:, 3] == EPS_LOG)


def test_fbank_batch_and_short():
  x = np.random.default_rng(1).standard_normal((3, 5000)).astype(np.float32)
  batch = kaldi_fbank(x)
  assert batch.shape == (3, 29, 128)
  np.testing.assert_array_equal(batch[1], kaldi_fbank(x[1]))
  assert kaldi_fbank(x[0, :399]).shape == (0, 128)
  assert kaldi_fbank(x[0, :400]).shape == (1, 128)
  # Blocks of frames: several rows per block, or a row cut into several blocks.
  for block in (10, 64):
    np.testing.assert_array_equal(kaldi_fbank(x, block_frames=block), batch)
  np.testing.assert_array_equal(kaldi_fbank(x, block_frames=10, threads=1),
                                kaldi_fbank(x, block_frames=10, threads=3))


def test_fbank_buffers_reused_across_frame_sizes_give_the_same_result():
  # 48 kHz and 44.1 kHz frames (1200 and 1102 samples) share an FFT size of 2048; each thread reuses
  # its buffers, so a shorter frame after a longer one must not see the longer one's samples.
  x = np.random.default_rng(2).standard_normal(9000).astype(np.float32)
  fresh = kaldi_fbank(x, 44100, threads=1)
  kaldi_fbank(x, 48000, threads=1)
  np.testing.assert_array_equal(kaldi_fbank(x, 44100, threads=1), fresh)


# -- Clip sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("divisor", [8, 7])
@pytest.mark.parametrize("duration", [0.5, 1.2, 2.0, 5.0, 17.99, 18.0, 30.03125, 61.7])
def test_clip_bounds(duration, divisor):
  ours = clip_bounds(duration, spacing_divisor=divisor)
  assert ours == ref_timepoints(duration, divisor)
  assert len(ours) == 8 and ours[0][0] == 0
  if duration > 2:
    assert ours[-1][0] == Fraction(duration - 2) * 7 / divisor
  if divisor == 8:  # the release's pytorchvideo 0.1.5 sampler itself
    from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler
    assert ours == imagebind_data().get_clip_timepoints(ConstantClipsPerVideoSampler(2, 8), duration)


def test_inplace_mean_on_overlapping_stereo_clips():
  """5 s stereo with channel means +0.2 / -0.4: clips overlap, so each clip's slice is already
  shifted by the previous clips' means; only the in-place replay reproduces the reference."""
  x = tone_mix(5.0, 16000, 2)
  feats, raw = ref_features(x, 16000, return_clips=True)
  clips = sample_clips(Waveform(x, 16000))
  for ours, ref in zip(clips, raw, strict=True):
    np.testing.assert_allclose(ours, ref, atol=1e-6)
  naive = x[0, int(Fraction(3, 8) * 16000):int(Fraction(19, 8) * 16000)]
  naive = naive - x[:, int(Fraction(3, 8) * 16000):int(Fraction(19, 8) * 16000)].mean()
  assert np.abs(naive - clips[1]).max() > 1e-2  # the sequential shifts are really there
  assert np.abs(audio_features(Waveform(x, 16000)) - feats).max() <= 1e-3


def test_spacing_divisor_seven():
  x = tone_mix(6.0, 16000, 1)
  ours = audio_features(Waveform(x, 16000), spacing_divisor=7)
  ref = ref_features(x, 16000, divisor=7)
  assert np.abs(ours - ref).max() <= 1e-3
  assert np.abs(ours - audio_features(Waveform(x, 16000))).max() > 1e-2


# -- Whole pipeline on files -----------------------------------------------------------------------

def test_aac_video_16k_matches_reference(tmp_path):
  path = write_media(tmp_path / "v.mp4", tone_mix(3.0, 16000, 1), 16000)
  samples, rate = decode(path)
  assert rate == 16000
  ours = audio_features(path)
  assert ours.shape == (8, 1, 128, 204) and ours.dtype == np.float32
  assert np.abs(ours - ref_features(samples, rate)).max() <= 1e-3


@pytest.mark.parametrize("rates", [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000),
                                   (16000, 44100)])
def test_resample_matches_torchaudio(rates):
  x = tone_mix(0.7, rates[0], 2)
  ours = resample(x, *rates)
  ref = torchaudio.functional.resample(torch.from_numpy(x), *rates).numpy()
  assert ours.shape == ref.shape
  # torchaudio builds its kernel in float32 (phases i / 441 etc.); ours is float64.
  assert np.abs(ours - ref).max() <= 5e-5


@pytest.mark.parametrize("rate", [44100, 48000])
def test_aac_video_resampled_matches_reference(tmp_path, rate):
  path = write_media(tmp_path / "v.mp4", tone_mix(4.0, rate, 2), rate)
  samples, got_rate = decode(path)
  assert got_rate == rate
  ref = ref_features(samples, rate)
  ours = audio_features(path)
  assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-3
  w = load_audio(path)
  assert w.sample_rate == 16000
  assert w.samples.shape[1] == int(np.ceil(samples.shape[1] * 16000 / rate))
  # soxr HQ instead of the reference's sinc: its passband ends near 7.3 kHz, so the top mel bins
  # (~115-127) lose most of their energy: measured max 0.69 (44.1 kHz) / 0.70 (48 kHz) in
  # normalised units there, <= 3e-3 in mel bins below 112.
  soxr = audio_features(path, resampler="soxr")
  diff = np.abs(soxr - ref)
  print(f"{rate} Hz soxr: max |soxr - reference| = {diff.max():.3e}, "
        f"below mel bin 112: {diff[:, :, :112].max():.3e}")
  assert diff[:, :, :112].max() <= 1e-2 and diff.max() <= 1.5


def test_short_audio(tmp_path):
  x = tone_mix(1.2, 16000, 1)
  path = str(tmp_path / "short.wav")
  sf.write(path, x[0], 16000, subtype="FLOAT")
  ours = audio_features(path)
  assert all(b == (0, 2) for b in clip_bounds(1.2))
  assert np.abs(ours - ref_features(x, 16000)).max() <= 1e-3
  np.testing.assert_allclose(ours[:, :, :, 118:], 4.268 / 9.138, atol=1e-6)  # 118 frames, then 0
  tiny = audio_features(Waveform(x[:, :200], 16000))  # no whole frame: all padding
  assert np.allclose(tiny, 4.268 / 9.138)


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("wav", "PCM_U8"), ("wav", "FLOAT"),
                                         ("flac", "PCM_24"), ("ogg", "VORBIS"),
                                         ("mp3", "MPEG_LAYER_III")])
def test_audio_files(tmp_path, ext, subtype):
  x = tone_mix(1.0, 22050, 2)
  path = str(tmp_path / f"a.{ext}")
  sf.write(path, x.T, 22050, subtype=subtype)
  native = load_audio(path, None)
  expected = sf.read(path, dtype="float32", always_2d=True)[0].T
  assert native.sample_rate == 22050 and native.samples.shape == expected.shape
  np.testing.assert_allclose(native.samples, expected, atol=1e-5)
  w = load_audio(path)
  assert w.sample_rate == 16000 and w.samples.shape == (2, 16000)


@pytest.mark.parametrize("name,codec,video_codec", [
    ("a.mkv", "libopus", "libx264"), ("a.webm", "libopus", "libvpx"), ("a.mov", "aac", "libx264"),
    ("a.avi", "libmp3lame", "mpeg4")])
def test_video_containers(tmp_path, name, codec, video_codec):
  for c in (codec, video_codec):
    if c not in av.codecs_available:
      pytest.skip(f"the bundled FFmpeg has no {c} encoder")
  rate = 48000
  path = write_media(tmp_path / name, tone_mix(2.5, rate, 2), rate, codec=codec,
                     video_codec=video_codec)
  samples, _ = decode(path)
  w = load_audio(path)
  assert w.sample_rate == 16000 and w.samples.shape == (2, int(np.ceil(samples.shape[1] / 3)))
  assert audio_features(path).shape == (8, 1, 128, 204)


def test_video_without_audio(tmp_path):
  path = write_media(tmp_path / "silent.mp4", None)
  assert load_audio(path) is None
  assert audio_features(path) is None


def test_missing_and_corrupt_files(tmp_path):
  missing = str(tmp_path / "nope.mp4")
  with pytest.raises(MediaError, match="nope.mp4"):
    load_audio(missing)
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(MediaError, match="corrupt.mp4"):
    audio_features(corrupt)
  assert issubclass(MediaError, ValueError)


def test_fbank_speed():
  x = tone_mix(10.0, 16000, 1)
  w = Waveform(x, 16000)
  audio_features(w)
  t = time.perf_counter()
  for _ in range(5):
    audio_features(w)
  per_video = (time.perf_counter() - t) / 5
  print(f"audio_features of a 10 s waveform at 16 kHz: {per_video * 1e3:.1f} ms")
  assert per_video < 0.2  # ~20 ms here; a loose bound so a busy machine does not fail it


# -- Against the installed ImageBind loader --------------------------------------------------------

def imagebind_audio(monkeypatch, path, waveform):
  """The release's `load_and_transform_audio_data([path], clips_per_video=8)` (Video-LLaMA's demo
  call) with torchaudio.load (torchcodec-based, not installed) returning `waveform`."""
  data = imagebind_data()

  def load(p):
    assert p == path
    return torch.from_numpy(waveform.samples.copy()), waveform.sample_rate

  monkeypatch.setattr(data.torchaudio, "load", load)
  with torch.inference_mode():
    out = data.load_and_transform_audio_data([path], device="cpu", clips_per_video=8)
  assert out.shape == (1, 8, 1, 128, 204)
  return out[0].numpy()


@pytest.mark.parametrize("seconds,rate,channels,layout", [
    (5.0, 44100, 2, "overlapping"), (20.0, 44100, 2, "disjoint"), (1.5, 44100, 2, "short"),
    (3.0, 16000, 1, "overlapping")])
def test_aac_video_matches_installed_imagebind(tmp_path, monkeypatch, seconds, rate, channels, layout):
  path = write_media(tmp_path / "v.mp4", tone_mix(seconds, rate, channels), rate)
  native = load_audio(path, None)
  samples, got_rate = decode(path)  # our loader decodes what PyAV's own float conversion gives
  assert native.sample_rate == got_rate == rate
  np.testing.assert_array_equal(native.samples, samples)
  starts = [start for start, _ in clip_bounds(native.duration)]
  if layout == "overlapping":
    assert 0 < starts[1] < 2
  elif layout == "disjoint":
    assert starts[1] >= 2
  else:
    assert starts == [0] * 8
  ref = imagebind_audio(monkeypatch, path, native)
  ours = audio_features(path)
  diff = np.abs(ours - ref).max()
  print(f"{seconds:g} s {rate} Hz x{channels}: max |ours - imagebind| = {diff:.2e}")
  assert diff <= 1e-3
  # The replay the other tests use is the installed loader, op for op.
  np.testing.assert_allclose(ref_features(samples, rate), ref, rtol=0, atol=1e-6)


# -- The bad inputs, each against the reference path --------------------------------------

def test_half_second_clip_matches_reference(tmp_path):
  x = tone_mix(0.5, 16000, 1)
  path = str(tmp_path / "half.wav")
  sf.write(path, x[0], 16000, subtype="FLOAT")
  ours = audio_features(path)
  assert ours.shape == (8, 1, 128, 204)
  assert np.abs(ours - ref_features(x, 16000)).max() <= 1e-3
  np.testing.assert_allclose(ours[:, :, :, 48:], 4.268 / 9.138, atol=1e-6)  # 48 frames of 8000 samples


def test_six_channel_audio_uses_channel_zero_after_the_all_channel_mean(tmp_path):
  x = tone_mix(3.0, 16000, 6)  # 5.1: six channels, each with its own offset
  path = str(tmp_path / "surround.wav")
  sf.write(path, x.T, 16000, subtype="FLOAT")
  w = load_audio(path)
  assert w.samples.shape == (6, 48000)
  assert np.abs(audio_features(path) - ref_features(x, 16000)).max() <= 1e-3


def test_8khz_file_is_resampled_like_the_reference(tmp_path):
  x = tone_mix(2.5, 8000, 1)
  path = str(tmp_path / "narrow.wav")
  sf.write(path, x[0], 8000, subtype="FLOAT")
  assert load_audio(path).sample_rate == 16000
  assert np.abs(audio_features(path) - ref_features(x, 8000)).max() <= 1e-3


def test_truncated_video_is_decoded_up_to_the_cut_or_named(tmp_path):
  path = write_media(tmp_path / "whole.mp4", tone_mix(3.0, 16000, 1), 16000, video_seconds=3.0)
  data = open(path, "rb").read()
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(data[: len(data) // 2])
  try:
    features = audio_features(cut)
  except MediaError as e:  # the index (moov) may be lost with the tail: then a clear error
    assert "cut.mp4" in str(e)
  else:
    assert features is None or (features.shape == (8, 1, 128, 204) and np.isfinite(features).all())
