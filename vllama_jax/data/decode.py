"""Training video decoding: frames at chosen indices, uint8, resized as decord does.

Same decoding as `vllama_jax.media.video.load_video` (nearest-timestamp frames, FFmpeg bicubic
resize to size x size, rotation), but the indices are chosen by the caller from the frame count
and the frames stay uint8 so that the train-time crop can run on them.
"""

from __future__ import annotations

from typing import Callable, Sequence

from vllama_jax.media.video import decode_frames


def load_video_indices(path, choose: Callable[[int], Sequence[int]] | Sequence[int],
                       size: int = 224):
  """(uint8 frames (T, size, size, 3), indices, fps). `choose(num_frames)` gives sorted indices.

  Raises MediaError for a missing, unreadable or frameless video; ValueError from `choose`.
  """
  frames, indices, _, info = decode_frames(path, choose, size, threads=2)
  return frames, indices, info.fps
