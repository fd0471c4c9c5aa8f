"""Training video decoding: frames at chosen indices, uint8, resized as decord does.

Same decoding as `vllama_jax.media.video.load_video` (nearest-timestamp frames, FFmpeg bicubic
resize to size x size, rotation), but the indices are chosen by the caller from the frame count
and the frames stay uint8 so that the train-time crop can run on them.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np

from vllama_jax.media import MediaError
from vllama_jax.media import video as _video


def load_video_indices(path, choose: Callable[[int], Sequence[int]] | Sequence[int],
                       size: int = 224):
  """(uint8 frames (T, size, size, 3), indices, fps). `choose(num_frames)` gives sorted indices.

  Raises MediaError for a missing, unreadable or frameless video; ValueError from `choose`.
  """
  import av
  path, container, stream = _video._open(path)
  try:
    with container:
      stream.thread_type = "AUTO"
      stream.thread_count = min(2, os.cpu_count() or 1)
      info = _video._info(path, container, stream)
      if info.num_frames < 1:
        raise MediaError(f"{path}: the video stream holds no frames")
      indices = [int(i) for i in (choose(info.num_frames) if callable(choose) else choose)]
      if not indices or indices != sorted(indices) or indices[-1] >= info.num_frames:
        raise ValueError(f"{path}: bad frame indices {indices} for {info.num_frames} frames")
      cursor = _video._Cursor(container, stream, info.fps)
      cursor.restart()
      first, t0 = cursor.nearest(-math.inf)
      if first is None:
        raise MediaError(f"{path}: the video stream holds no decodable frame")
      frames, start = [], 0
      if indices[0] == 0:
        frames.append(_video._resize(first, size))
        start = 1
      targets = [t0 + i / info.fps for i in indices[start:]]
      keys = _video._keyframe_times(path, stream.index, targets) if targets else []
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
        frames.append(_video._resize(frame, size))
  except av.error.FFmpegError as e:
    raise MediaError(f"{path}: cannot decode the video stream ({e})") from e
  return np.stack(frames), indices, info.fps
