"""Tiny test media written with PyAV and soundfile."""

from __future__ import annotations

import av
import numpy as np

LAYOUTS = {1: "mono", 2: "stereo"}


def tone_mix(seconds, rate, channels=1, seed=0):
  """Speech-like test audio: harmonics of a gliding pitch with slow amplitude modulation, plus a
  little noise; channel c is offset by a different DC so channel means differ. (channels, n)."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(round(seconds * rate))) / rate
  f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
  phase = 2 * np.pi * np.cumsum(f0) / rate
  x = sum(np.sin(h * phase) / h * np.exp(-((h * 140 - 700) / 900) ** 2) for h in range(1, 30))
  x *= 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
  x = 0.4 * x / np.abs(x).max() + 0.01 * rng.standard_normal(t.shape)
  out = np.stack([x * (1 - 0.3 * c) + 0.2 * (-1) ** c * (c + 1) for c in range(channels)])
  return np.clip(out, -1, 1).astype(np.float32)


def _audio_frame(chunk, stream):
  fmt = stream.codec_context.format
  layout = LAYOUTS[chunk.shape[0]]
  if fmt.name.startswith("s16"):
    chunk = (chunk * 32767).astype(np.int16)
  elif fmt.name.startswith("s32"):
    chunk = (chunk.astype(np.float64) * 2147483647).astype(np.int32)
  if not fmt.is_planar:
    chunk = chunk.T.reshape(1, -1)
  frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt.name, layout=layout)
  frame.sample_rate = stream.codec_context.sample_rate
  return frame


def write_media(path, samples=None, rate=16000, codec="aac", video=True, video_codec="libx264",
                video_seconds=1.0):
  """A container with an optional tiny video stream and an optional audio stream."""
  with av.open(str(path), "w") as out:
    if video:
      vs = out.add_stream(video_codec, rate=10)
      vs.width = vs.height = 32
      vs.pix_fmt = "yuv420p"
    if samples is not None:
      a = out.add_stream(codec, rate=rate)
      a.layout = LAYOUTS[samples.shape[0]]
    if video:
      for i in range(int(video_seconds * 10)):
        img = np.full((32, 32, 3), (i * 20) % 255, np.uint8)
        for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
          out.mux(p)
      for p in vs.encode():
        out.mux(p)
    if samples is not None:
      step = a.codec_context.frame_size or 1024
      for i in range(0, samples.shape[1], step):
        frame = _audio_frame(samples[:, i:i + step], a)
        frame.pts = i
        for p in a.encode(frame):
          out.mux(p)
      for p in a.encode():
        out.mux(p)
  return str(path)


def decode(path):
  """All samples of the first audio stream as float32 (channels, n) and the rate, independently
  of vllama_jax (PyAV converts every sample format to planar float)."""
  with av.open(str(path)) as c:
    s = c.streams.audio[0]
    rs = av.AudioResampler(format="fltp")
    chunks = [f.to_ndarray() for frame in c.decode(s) for f in rs.resample(frame)]
    chunks += [f.to_ndarray() for f in rs.resample(None)]
    return np.concatenate(chunks, axis=1).astype(np.float32), s.codec_context.sample_rate
