"""Video input of Video-LLaMA's vision branch: the demo's `load_video(path, n_frms=8, height=224,
width=224, sampling="uniform", return_msg=True)` (decord) followed by the eval transform.

- Indices: n = min(num_frames, frame count) frames at floor(k * count / n), k < n (segment starts).
  A video shorter than `num_frames` gives all its frames, so T < 8 (the reference does the same).
  The reference computes `np.arange(0, count, count / n).astype(int)`; that is the same for n = 8
  (or any power of two), but for other n its float step sometimes yields n + 1 indices or one index
  too low, so the exact integer form is used.
- Frame i is the decoded frame whose timestamp is nearest to start + i / avg_fps (ties: the
  earlier). For constant frame rate this is the i-th frame, as decord counts; for variable frame
  rate it is the frame shown at the time the hint announces, where decord would take the i-th
  frame in presentation order.
- Frame count: the container's frame count, else floor(avg_fps * duration), else packets are
  counted by demuxing (no decoding). decord counts packets while indexing; the header count is
  the same for ordinary files, and the estimate avoids reading a whole long file.
- Decoding seeks to the keyframe before each wanted frame unless that keyframe is at or before
  the frame last decoded, then decodes forward; this code keeps at most two full-size frames.
- Resize: FFmpeg's swscale bicubic, fused with the conversion to rgb24 in one call (decord also
  converts and scales inside FFmpeg), to 224x224 without keeping the aspect ratio. Grayscale and
  alpha formats convert to rgb24 (alpha dropped). The display matrix's rotation (multiples of 90
  degrees, decord also applies it) is applied after the resize; flips in the matrix are ignored.
- Then ToTensor and Normalize with the CLIP constants: float32 (T, 224, 224, 3), channels-last.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from vllama_jax.media import MediaError
from vllama_jax.media.image import IMAGE_SIZE, normalize


@dataclass(frozen=True)
class VideoInfo:
  """What the container says about its first video stream."""
  num_frames: int
  fps: float  # average frame rate
  duration: float  # seconds
  width: int
  height: int
  codec: str


@dataclass(frozen=True)
class SampledVideo:
  """Sampled, resized and CLIP-normalised frames, float32 (T, size, size, 3), and where they came
  from: frame indices, the decoded frames' timestamps (seconds from the first frame) and the
  reference's time hint for the prompt."""
  frames: np.ndarray
  indices: tuple[int, ...]
  timestamps: tuple[float, ...]
  fps: float
  num_frames: int
  duration: float
  time_hint: str


def sample_indices(num_frames: int, n: int = 8) -> list[int]:
  """The reference's uniform sampling: min(n, num_frames) segment starts."""
  n = min(n, num_frames)
  return [k * num_frames // n for k in range(n)]


def time_hint(indices, fps: float) -> str:
  """The reference's message: 'The video contains 8 frames sampled at 0.0, 1.2, ... seconds. '
  (trailing space included), each time str(round(index / fps, 1))."""
  seconds = ", ".join(str(round(i / fps, 1)) for i in indices)
  return f"The video contains {len(indices)} frames sampled at {seconds} seconds. "


def _open(path):
  import av
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MediaError(f"{path}: no such video file")
  try:
    container = av.open(path)
  except av.error.FFmpegError as e:
    raise MediaError(f"{path}: not a video FFmpeg can read ({e})") from e
  if not container.streams.video:
    container.close()
    raise MediaError(f"{path}: no video stream (expected a file with at least one video stream)")
  return path, container, container.streams.video[0]


def _info(path, container, stream) -> VideoInfo:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  if not rate:
    raise MediaError(f"{path}: the video stream has no frame rate")
  fps = float(rate)
  if stream.duration is not None and stream.time_base:
    duration = float(stream.duration * stream.time_base)
  else:
    duration = container.duration / 1e6 if container.duration else 0.0
  count = stream.frames
  if count <= 0 and duration > 0:
    count = int(fps * duration + 1e-6)
  if count <= 0:  # count packets with a second demuxer (some inputs cannot seek back)
    import av
    with av.open(path) as again:
      count = sum(1 for p in again.demux(again.streams[stream.index]) if p.size)
  if not duration:
    duration = count / fps
  ctx = stream.codec_context
  return VideoInfo(int(count), fps, duration, ctx.width, ctx.height, ctx.name)


def probe_video(path) -> VideoInfo:
  """Frame count, average fps, duration, size and codec of the first video stream."""
  import av
  path, container, stream = _open(path)
  try:
    with container:
      return _info(path, container, stream)
  except av.error.FFmpegError as e:
    raise MediaError(f"{path}: cannot read the video stream ({e})") from e


class _Cursor:
  """Decodes one stream forward and picks the frame nearest to each (increasing) target time."""

  def __init__(self, container, stream, fps):
    self.container, self.stream, self.step = container, stream, 1.0 / fps
    self.frames = None
    self.prev = self.pending = (None, None)  # (frame, seconds)
    self.last_t, self.decoded = None, 0  # time of the last frame decoded, frames since restart

  def restart(self, seconds=None, from_start=False):
    """Decode on from the keyframe before `seconds`, from the start, or (neither) from here."""
    if self.frames is not None:
      self.frames.close()
    if from_start:
      self.container.seek(0)
    elif seconds is not None:
      ts = int(math.floor(seconds / self.stream.time_base))
      self.container.seek(ts, backward=True, any_frame=False, stream=self.stream)
    self.frames = self.container.decode(self.stream)
    self.prev = self.pending = (None, None)
    self.last_t, self.decoded = None, 0

  def _next(self):
    if self.pending[0] is not None:
      item, self.pending = self.pending, (None, None)
      return item
    frame = next(self.frames, None)
    if frame is None:
      return None, None
    if frame.pts is not None:
      t = float(frame.time)
    else:  # no timestamp: count on from the previous frame
      t = 0.0 if self.last_t is None else self.last_t + self.step
    self.last_t, self.decoded = t, self.decoded + 1
    return frame, t

  def nearest(self, target: float):
    """(frame, seconds) nearest to `target`; the last frame at the end of the stream."""
    while True:
      frame, t = self._next()
      if frame is None:
        return self.prev
      if t >= target:
        prev, prev_t = self.prev
        if prev is not None and target - prev_t <= t - target:
          self.pending = (frame, t)
          return self.prev
        self.prev = (frame, t)
        return self.prev
      self.prev = (frame, t)


def _keyframe_times(path, stream_index, targets):
  """Time of the keyframe a backward seek lands on for each target (None where unknown), found
  with a second demuxer so that the decoder's state is not lost."""
  import av
  times = []
  with av.open(path) as container:
    stream = container.streams[stream_index]
    for target in targets:
      t = None
      try:
        container.seek(int(math.floor(target / stream.time_base)), backward=True, stream=stream)
        for packet in container.demux(stream):
          ts = packet.pts if packet.pts is not None else packet.dts
          if ts is not None:
            t = float(ts * stream.time_base)
            break
      except av.error.FFmpegError:
        pass
      times.append(t)
  return times


def _resize(frame, size: int) -> np.ndarray:
  """The frame as uint8 (size, size, 3) RGB, bicubic, display rotation applied."""
  rgb = frame.reformat(width=size, height=size, format="rgb24",
                       interpolation="BICUBIC").to_ndarray()
  turns = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns
  return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def decode_frames(path, choose, size: int = IMAGE_SIZE, threads: int = 4):
  """(uint8 frames (T, size, size, 3), indices, timestamps from the first frame, VideoInfo) of the
  frames at `choose(num_frames)` (or a list of indices), each the frame nearest its timestamp.

  Raises MediaError when the file is missing, is not a video FFmpeg decodes, or has no video
  stream or no decodable frame; ValueError for indices that are not sorted and in range.
  """
  import av
  path, container, stream = _open(path)
  try:
    with container:
      stream.thread_type = "AUTO"  # frame threads hold a few frames each: keep them few
      stream.thread_count = min(threads, os.cpu_count() or 1)
      info = _info(path, container, stream)
      if info.num_frames < 1:
        raise MediaError(f"{path}: the video stream holds no frames")
      indices = [int(i) for i in (choose(info.num_frames) if callable(choose) else choose)]
      if not indices or indices != sorted(indices) or indices[0] < 0 or indices[-1] >= info.num_frames:
        raise ValueError(f"{path}: bad frame indices {indices} for {info.num_frames} frames")
      cursor = _Cursor(container, stream, info.fps)
      cursor.restart()
      first, t0 = cursor.nearest(-math.inf)
      if first is None:
        raise MediaError(f"{path}: the video stream holds no decodable frame")
      frames, times = ([_resize(first, size)], [t0]) if indices[0] == 0 else ([], [])
      targets = [t0 + i / info.fps for i in indices[len(frames):]]
      keys = _keyframe_times(path, stream.index, targets) if targets else []
      for target, key in zip(targets, keys):
        if key is not None and cursor.last_t is not None and cursor.last_t < key <= target:
          cursor.restart(target)
          frame, t = cursor.nearest(target)
          if cursor.decoded == 1 and t > target + cursor.step / 2:  # the seek overshot
            cursor.restart(from_start=True)
            frame, t = cursor.nearest(target)
        else:
          frame, t = cursor.nearest(target)
        if frame is None:
          raise MediaError(f"{path}: no decodable frame near {target:.3f} s")
        frames.append(_resize(frame, size))
        times.append(t)
  except av.error.FFmpegError as e:
    raise MediaError(f"{path}: cannot decode the video stream ({e})") from e
  return np.stack(frames), indices, tuple(round(t - t0, 6) for t in times), info


def load_video(path, num_frames: int = 8, size: int = IMAGE_SIZE) -> SampledVideo:
  """Sample `num_frames` frames (fewer when the video is shorter) as the reference demo does.

  Raises MediaError when the file is missing, is not a video FFmpeg decodes, or has no video
  stream or no decodable frame.
  """
  if num_frames < 1:
    raise ValueError(f"num_frames must be at least 1, got {num_frames}")
  frames, indices, timestamps, info = decode_frames(path, lambda n: sample_indices(n, num_frames), size)
  return SampledVideo(
      frames=normalize(frames), indices=tuple(indices), timestamps=timestamps, fps=info.fps,
      num_frames=info.num_frames, duration=info.duration, time_hint=time_hint(indices, info.fps))
