"""Train-time frame sampling and spatial augmentation, as the reference's LAVIS processors.

- Videos: `RandomResizedCropVideo(size, scale=(0.5, 1), ratio=(3/4, 4/3), "bicubic")` on the
  decoded float (C, T, H, W) clip: torch `F.interpolate(mode="bicubic", align_corners=False)`
  (A = -0.75, border indices clamped, no antialias), then `.to(torch.uint8)`, which truncates
  toward zero and, for bicubic overshoot outside [0, 256), wraps modulo 256 on x86 (e.g. -1.3 ->
  255, 256.2 -> 0). `overshoot="wrap"` (default) reproduces that; "clip" saturates instead.
- Images: torchvision `RandomResizedCrop(size, scale=(0.5, 1))` on the PIL image: PIL crop, then
  PIL bicubic resize (antialiased).
- Crop parameters follow torchvision's `get_params` (10 tries, then the central-crop fallback),
  drawn from a numpy Generator instead of torch's RNG: same distribution, not the same numbers.
- Frame sampling: "headtail" (WebVid) = n//2 sorted random indices from [0, vlen//2) and n//2
  from [vlen//2, vlen) (`random.sample`, so vlen//2 >= n//2 is needed); "uniform" = segment starts.
"""

from __future__ import annotations

import math

import numpy as np

SCALE = (0.5, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def crop_params(rng: np.random.Generator, height: int, width: int, scale=SCALE, ratio=RATIO):
  """torchvision RandomResizedCrop.get_params: (top, left, h, w)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))
      j = int(rng.integers(0, width - w + 1))
      return i, j, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _cubic(t: float, a: float = -0.75):
  def near(x):
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return far(t + 1), near(t), near(1 - t), far(2 - t)


def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of torch's upsample_bicubic2d along one axis (align_corners=False)."""
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = scale * (o + 0.5) - 0.5
    i0 = math.floor(src)
    for k, w in enumerate(_cubic(src - i0)):
      m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w
  return m.astype(np.float32)


def resize_bicubic(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """float32 (T, H, W, C) -> (T, out_h, out_w, C), as torch bicubic interpolation."""
  x = np.asarray(x, np.float32)
  mh = _bicubic_matrix(x.shape[1], out_h)
  mw = _bicubic_matrix(x.shape[2], out_w)
  y = np.einsum("oh,thwc->towc", mh, x, optimize=True)
  return np.einsum("pw,towc->topc", mw, y, optimize=True)


def to_uint8(x: np.ndarray, overshoot: str = "wrap") -> np.ndarray:
  """A float -> uint8 cast: truncation toward zero, then wrap (torch on x86) or clip."""
  if overshoot == "wrap":
    return (np.trunc(x).astype(np.int64) & 255).astype(np.uint8)
  if overshoot == "clip":
    return np.clip(np.trunc(x), 0, 255).astype(np.uint8)
  raise ValueError(f"overshoot must be 'wrap' or 'clip', got {overshoot!r}")


def crop_video(frames: np.ndarray, rng: np.random.Generator, size: int,
               overshoot: str = "wrap") -> np.ndarray:
  """uint8 (T, H, W, 3) -> uint8 (T, size, size, 3): RandomResizedCropVideo + ToUint8."""
  i, j, h, w = crop_params(rng, frames.shape[1], frames.shape[2])
  clip = frames[:, i:i + h, j:j + w].astype(np.float32)
  return to_uint8(resize_bicubic(clip, size, size), overshoot)


def crop_image(image, rng: np.random.Generator, size: int) -> np.ndarray:
  """PIL RGB image -> uint8 (size, size, 3): torchvision RandomResizedCrop on PIL, bicubic."""
  from PIL import Image
  width, height = image.size
  i, j, h, w = crop_params(rng, height, width)
  return np.asarray(image.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC))


def headtail_indices(rng: np.random.Generator, num_frames: int, n: int = 8) -> list[int]:
  """The reference's "headtail" sampling; ValueError when the video is too short."""
  half = num_frames // 2
  if half < n // 2:
    raise ValueError(f"{num_frames} frames are too few for headtail sampling of {n}")
  head = sorted(rng.choice(half, n // 2, replace=False).tolist())
  tail = sorted((half + rng.choice(num_frames - half, n // 2, replace=False)).tolist())
  return head + tail
