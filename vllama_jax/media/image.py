"""Image input of Video-LLaMA's vision branch: the demo's `Image.open(path).convert('RGB')` then
LAVIS `blip2_image_eval` (Resize((224, 224), bicubic) on the PIL image, ToTensor, Normalize with
the CLIP constants), as one frame channels-last: float32 (1, 224, 224, 3).

Like the reference, the aspect ratio is not kept and EXIF orientation is ignored unless
`exif_transpose=True`.
"""

from __future__ import annotations

import os

import numpy as np

from vllama_jax.media import MediaError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224


def normalize(rgb: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  """uint8 (..., 3) RGB -> float32 (x / 255 - mean) / std, in float32 as torchvision's ToTensor
  and Normalize compute it (bit-exact)."""
  x = np.asarray(rgb).astype(np.float32)
  x /= np.float32(255)  # in place: one float copy of the input at a time
  x -= np.asarray(mean, np.float32)
  x /= np.asarray(std, np.float32)
  return x


def load_image(source, size: int = IMAGE_SIZE, exif_transpose: bool = False) -> np.ndarray:
  """One image file (or PIL image) as model input: float32 (1, size, size, 3), CLIP-normalised.

  Raises MediaError when the file is missing or PIL cannot decode it.
  """
  from PIL import Image
  name = "image" if isinstance(source, Image.Image) else os.fspath(source)
  if name != "image" and not os.path.isfile(name):
    raise MediaError(f"{name}: no such image file")
  try:
    if isinstance(source, Image.Image):
      image = _prepare(source, exif_transpose)
    else:
      with Image.open(name) as opened:
        image = _prepare(opened, exif_transpose)
    image = image.resize((size, size), Image.BICUBIC)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise MediaError(f"{name}: cannot decode as an RGB image ({e})") from e
  return normalize(np.asarray(image))[None]


def _prepare(image, exif_transpose: bool):
  from PIL import ImageOps
  image.load()
  if exif_transpose:
    image = ImageOps.exif_transpose(image)
  return image.convert("RGB")  # a copy, so the file can be closed
