"""Tiny test videos written with PyAV: frame i is flat gray LEVEL0 + STEP * i (so a sampled frame
tells its index), with a red marker in the top-left corner and a moving checkerboard in the
bottom-right one."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

LEVEL0, STEP = 16, 7
MAX_FRAMES = (255 - LEVEL0) // STEP
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def index_frame(i: int, width: int, height: int, channels: int = 3) -> np.ndarray:
  """uint8 (height, width, channels) picture of frame i; a 4th channel is a varying alpha."""
  level = LEVEL0 + STEP * (i % (MAX_FRAMES + 1))
  img = np.full((height, width, channels), level, np.uint8)
  qh, qw = max(height // 4, 1), max(width // 4, 1)
  img[:qh, :qw, :3] = (255, 0, 0)[:channels]
  yy, xx = np.mgrid[:qh, :qw]
  img[height - qh:, width - qw:, :3] = np.where(((yy + xx + i) // 2) % 2, 230, 20)[..., None]
  if channels == 4:
    img[..., 3] = np.arange(width, dtype=np.uint8)[None, :] * 255 // max(width - 1, 1)
  return img


def textured_frame(i: int, width: int, height: int) -> np.ndarray:
  """A frame with gradients, edges and fine detail, to compare resize methods on."""
  yy, xx = np.mgrid[:height, :width].astype(np.float64)
  r = 127 + 100 * np.sin(xx / 7 + i) * np.cos(yy / 11)
  g = 255 * xx / max(width - 1, 1)
  b = np.where((xx // 16 + yy // 16 + i) % 2, 200, 40)
  return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def read_indices(frames: np.ndarray) -> list[int]:
  """Frame indices back from CLIP-normalised (T, H, W, 3) frames: the gray level at the centre."""
  h, w = frames.shape[1:3]
  centre = frames[:, h * 3 // 8:h * 5 // 8, w * 3 // 8:w * 5 // 8]
  level = (centre * CLIP_STD + CLIP_MEAN).mean(axis=(1, 2, 3)) * 255
  return [int(round((v - LEVEL0) / STEP)) for v in level]


DECODERS = {"libx264": "h264", "libx265": "hevc", "libvpx-vp9": "vp9", "libsvtav1": "av1",
            "libaom-av1": "av1"}


def has_codec(encoder: str) -> bool:
  """The local FFmpeg has the encoder and a decoder for what it writes."""
  try:
    av.codec.Codec(encoder, "w")
    av.codec.Codec(DECODERS.get(encoder, encoder), "r")
  except Exception:  # noqa: BLE001 -- any failure means "not available"
    return False
  return True


def write_video(path, codec="libx264", num_frames=20, width=64, height=48, rate=10,
                pix_fmt="yuv420p", pts=None, time_base=None, options=None,
                frame=index_frame, frame_format="rgb24", audio_first=False):
  """Encode `num_frames` frames; `pts` (in `time_base` units) makes a variable frame rate;
  `audio_first` puts a silent audio stream before the video one."""
  channels = {"rgb24": 3, "rgba": 4, "gray": 1}[frame_format]
  with av.open(str(path), "w") as out:
    audio = out.add_stream("pcm_s16le", rate=8000) if audio_first else None
    stream = out.add_stream(codec, rate=rate, options=options or {})
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    stream.codec_context.thread_count = 1
    if time_base is not None:
      stream.time_base = stream.codec_context.time_base = Fraction(time_base)
    for i in range(num_frames):
      img = frame(i, width, height, channels) if frame is index_frame else frame(i, width, height)
      if frame_format == "gray":
        img = img[..., 0]
      vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format=frame_format)
      if pts is not None:
        vf.pts, vf.time_base = pts[i], Fraction(time_base)
      for packet in stream.encode(vf):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
    if audio is not None:  # muxed last: the header needs the video encoder opened first
      silence = av.AudioFrame.from_ndarray(np.zeros((1, 8000 * num_frames // rate), np.int16),
                                           format="s16", layout="mono")
      silence.sample_rate = 8000
      for packet in list(audio.encode(silence)) + list(audio.encode()):
        out.mux(packet)
  return path


def with_display_rotation(src, dst, degrees):
  """`src` remuxed to `dst` with a display matrix turning it `degrees` counter-clockwise: the same
  coded frames. (x264 does not always encode the same frames to the same bits, even on one thread:
  4 of 4,300 default-preset encodes differed in a stress test here, none of 3,000 ultrafast ones.)"""
  with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
    stream = out.add_stream_from_template(inp.streams.video[0])
    stream.set_display_rotation(degrees)
    for packet in inp.demux(inp.streams.video[0]):
      if packet.dts is not None:  # the demuxer's flush packet
        packet.stream = stream
        out.mux(packet)
  return dst


def decode_all(path):
  """Every frame of the first video stream, in decoding order, as PyAV VideoFrames."""
  with av.open(str(path)) as container:
    return list(container.decode(video=0))


# What each broken video beside a synthetic dataset is skipped as ("missing" is named but not written).
BROKEN_VIDEOS = {"missing": "missing file", "bad": "corrupt media", "short": "short video", "silent": "no audio"}


def synthetic_with_broken_videos(directory):
  """A 4 + 1 video synthetic dataset in `directory` with BROKEN_VIDEOS beside its training videos;
  returns (its videos directory, the training names: the 4 good ones, then the broken ones)."""
  from vllama_jax.data import synthetic
  videos = synthetic.generate(directory, num_train=4, num_test=1, seed=0, workers=1) / "videos"
  (videos / "train" / "bad.mp4").write_bytes(b"\x00not a video" * 50)
  write_video(videos / "train" / "short.mp4", num_frames=5, width=48, height=40)
  write_video(videos / "train" / "silent.mp4", num_frames=20, width=48, height=40)
  return videos, [f"train_{i:05d}" for i in range(4)] + list(BROKEN_VIDEOS)
