"""Ahead-of-time media cache: decoded training frames and filterbanks in an ArrayRecord TFDS dataset.

One record per video file, keyed by its path (`os.path.normpath` of the records' "media"):
  media          the path
  broken         "" or why the video is skipped ("missing file", "corrupt media", "short video",
                 "bad sample"), the counters SampleBuilder files it under when decoding
  frames         uint8 (P, size, size, 3): the decoded, resized frames of the pool, before the
                 train-time crop and the CLIP normalisation (zlib-compressed)
  indices        int64 (P,): the pool's frame indices in the video, sorted
  num_frames     the video's frame count; fps: its average frame rate (float64, exact)
  time_hint      the reference's hint for the uniform indices (SampleBuilder recomputes it from
                 the chosen indices and fps, which gives the same string)
  audio_broken   with audio: "" or why the audio is skipped ("no audio", "corrupt media", ...)
  filterbanks    with audio: (8, 1, 128, 204) ImageBind filterbanks, float32 or float16; 0 rows
                 when audio_broken

The pool is the frames a sample may draw from. SampleBuilder picks its indices over the pool
(`choose(P)`) exactly as it picks them over a decoded video (`choose(num_frames)`):
  "uniform"  P = num_frames uniform indices: exact for uniform sampling (instruction data,
             evaluation); the caption path's random head/tail draw then always takes the whole
             pool, so training captions lose their temporal jitter. ~1.2 MB a video at 224 px.
  "all"      every frame: exact for any sampling, head/tail and crops included (the same random
             numbers are drawn), at ~150 kB a frame at 224 px (a 10 s 25 fps clip: 37 MB).
  FPS        e.g. "2": max(num_frames, ceil(seconds * FPS)) uniform indices; head/tail draws
             over the pool keep some jitter, but no sampling is exact any more.
Images are not cached (decoding a JPEG costs little); videos missing from the cache are decoded.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tensorflow_datasets as tfds

from vllama_jax.data import text
from vllama_jax.data.samples import SKIPPED, skip_reason
from vllama_jax.errors import ConfigError, VllamaError
from vllama_jax.media.audio import audio_features
from vllama_jax.media.video import decode_frames, probe_video, sample_indices, time_hint

NAME, VERSION, SPLIT = "vllama_media_cache", "1.0.0", "media"
AUDIO_SHAPE = (8, 1, 128, 204)
DTYPES = ("float32", "float16")


def check_pool(pool: str) -> str:
  pool = str(pool)
  if pool not in ("uniform", "all"):
    try:
      if not float(pool) > 0:
        raise ValueError
    except ValueError:
      raise ConfigError(f"frame pool {pool!r}: expected 'uniform', 'all' or frames per second > 0") from None
  return pool


def pool_indices(count: int, fps: float, n: int, pool: str) -> list[int]:
  """The frame indices a video of `count` frames caches; BrokenSample when it is too short."""
  if count < n:  # SampleBuilder.video's check, same reason
    raise text.BrokenSample("short video", f"{count} frames, {n} needed")
  if pool == "uniform":
    return sample_indices(count, n)
  if pool == "all":
    return list(range(count))
  return sample_indices(count, max(n, math.ceil(count / fps * float(pool) - 1e-9)))


def cache_entry(path: str, num_frames: int, size: int, pool: str, audio: bool,
                audio_dtype: str = "float32") -> dict:
  """One record: decodes `path` as SampleBuilder does and files failures under its reasons."""
  entry = {"media": path, "broken": "", "frames": np.zeros((0, size, size, 3), np.uint8),
           "indices": np.zeros((0,), np.int64), "num_frames": 0, "fps": np.float64(0.0),
           "time_hint": ""}
  try:
    fps = probe_video(path).fps if pool not in ("uniform", "all") else 0.0
    # the decoding of data.decode.load_video_indices, which also returns the frame count
    frames, indices, _, info = decode_frames(path, lambda c: pool_indices(c, fps, num_frames, pool), size,
                                             threads=2)
    entry.update(frames=frames, indices=np.asarray(indices, np.int64), num_frames=info.num_frames,
                 fps=np.float64(info.fps),
                 time_hint=time_hint(sample_indices(info.num_frames, num_frames), info.fps))
  except SKIPPED as e:
    entry["broken"] = skip_reason(e, path)
  if audio:
    entry.update(audio_broken="", filterbanks=np.zeros((0,) + AUDIO_SHAPE[1:], audio_dtype))
    if not entry["broken"]:
      try:
        bank = audio_features(path)
        if bank is None:
          raise text.BrokenSample("no audio")
        entry["filterbanks"] = bank.astype(audio_dtype)
      except SKIPPED as e:
        entry["audio_broken"] = skip_reason(e, path)
  return entry


class MediaCacheBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes one ArrayRecord record per path (`settings`: num_frames, size, pool, audio,
  audio_dtype). Records are not shuffled, so record i is paths[i] (sorted)."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)
  code_path = None  # no checksums to look up (finding them needs importlib_resources, not installed)

  def __init__(self, *, paths=(), settings=None, num_threads=2, **kwargs):
    self._paths, self._settings, self._threads = list(paths), dict(settings or {}), num_threads
    super().__init__(**kwargs)

  def _info(self):
    s, f = self._settings, tfds.features
    features = {"media": f.Text(), "broken": f.Text(), "time_hint": f.Text(),
                "frames": f.Tensor(shape=(None, s["size"], s["size"], 3), dtype=np.uint8, encoding="zlib"),
                "indices": f.Tensor(shape=(None,), dtype=np.int64),
                "num_frames": f.Scalar(dtype=np.int64),
                "fps": f.Tensor(shape=(), dtype=np.float64, encoding="bytes")}  # a plain float is float32
    if s["audio"]:
      features.update(audio_broken=f.Text(),
                      filterbanks=f.Tensor(shape=(None,) + AUDIO_SHAPE[1:], dtype=np.dtype(s["audio_dtype"]),
                                                  encoding="bytes"))  # a FloatList is built float by float
    return tfds.core.DatasetInfo(builder=self, features=f.FeaturesDict(features), disable_shuffling=True,
                                 metadata=tfds.core.MetadataDict(s, paths=self._paths))

  def _split_generators(self, dl_manager):
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    s = self._settings
    args = (s["num_frames"], s["size"], s["pool"], s["audio"], s["audio_dtype"])
    window = 4 * self._threads  # bounded read-ahead
    counts = self.info.metadata["broken"] = {}  # the metadata is written after the records
    with ThreadPoolExecutor(self._threads) as pool:
      for start in range(0, len(self._paths), window):
        chunk = self._paths[start:start + window]
        for i, entry in enumerate(pool.map(lambda p: cache_entry(p, *args), chunk)):
          reason = entry["broken"] or entry.get("audio_broken")
          if reason:
            counts[reason] = counts.get(reason, 0) + 1
          yield start + i, entry  # integer keys: without shuffling, records are sorted by key


def build_cache(paths, out_dir: str, *, num_frames: int, size: int, audio: bool, pool: str = "uniform",
                audio_dtype: str = "float32", num_threads: int = 2, quiet: bool = False) -> str:
  """Writes the cache of `paths` under `out_dir` (a no-op when it already holds the same cache);
  returns the dataset directory that `data.cache_dir` may name (`out_dir` works too)."""
  if audio_dtype not in DTYPES:
    raise ConfigError(f"audio dtype {audio_dtype!r}: expected one of {DTYPES}")
  paths = sorted({os.path.normpath(p) for p in paths})
  settings = dict(num_frames=int(num_frames), size=int(size), pool=check_pool(pool), audio=bool(audio),
                  audio_dtype=audio_dtype)
  directory = os.path.join(out_dir, NAME, VERSION)
  if os.path.exists(directory):
    cache = MediaCache(directory)
    if cache.settings != settings or cache.paths != paths:
      raise ConfigError(f"{directory} already holds a media cache of other settings or files "
                        f"({cache.settings}, {len(cache.paths)} files); remove it or choose another "
                        "directory")
    return directory
  builder = MediaCacheBuilder(paths=paths, settings=settings, num_threads=num_threads, data_dir=out_dir,
                             file_format="array_record")
  if quiet:  # no progress bars, and not TFDS's "Downloading and preparing" lines on stdout
    from tensorflow_datasets.core.utils import tqdm_utils
    shown = tqdm_utils._active
    tfds.display_progress_bar(False)
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare()
    finally:
      tfds.display_progress_bar(shown)
  else:
    builder.download_and_prepare()
  downloads = os.path.join(out_dir, "downloads")
  if os.path.isdir(downloads) and not os.listdir(downloads):
    os.rmdir(downloads)
  return directory


@dataclass(frozen=True)
class CachedVideo:
  broken: str
  frames: np.ndarray  # uint8 (P, S, S, 3)
  indices: np.ndarray  # (P,)
  fps: float
  audio_broken: str = ""
  filterbanks: np.ndarray | None = None

  def frames_at(self, choose):
    """(frames, indices, fps) of the pool positions `choose(P)`, as load_video_indices."""
    positions = list(choose(len(self.indices)))
    return self.frames[positions], [int(self.indices[p]) for p in positions], self.fps


def _dataset_dir(directory: str) -> str:
  nested = os.path.join(directory, NAME, VERSION)
  return nested if os.path.isdir(nested) else directory


class MediaCache:
  """Reads a cache written by `build_cache`; `get(path)` is None for a path it does not hold."""

  def __init__(self, directory: str):
    self.directory = _dataset_dir(directory)
    if not os.path.isfile(os.path.join(self.directory, "dataset_info.json")):
      raise ConfigError(f"data.cache_dir {directory!r} holds no media cache (build one with "
                        "`python -m vllama_jax.data.cache`)")
    builder = tfds.builder_from_directory(self.directory)
    meta = dict(builder.info.metadata)
    self.paths = list(meta.pop("paths"))
    self.broken = dict(meta.pop("broken", {}))  # videos by reason (audio reasons where only audio fails)
    self.settings = meta
    self._index = {p: i for i, p in enumerate(self.paths)}
    self._source = builder.as_data_source(SPLIT)

  def check(self, num_frames: int, size: int, audio: bool) -> None:
    s = self.settings
    if (s["num_frames"], s["size"]) != (num_frames, size) or (audio and not s["audio"]):
      raise ConfigError(f"media cache {self.directory} holds {s['num_frames']} frames of {s['size']} px"
                        f"{' with' if s['audio'] else ' without'} audio; the data config needs {num_frames} "
                        f"frames of {size} px{' with audio' if audio else ''}")

  def __len__(self):
    return len(self.paths)

  def get(self, path: str) -> CachedVideo | None:
    i = self._index.get(os.path.normpath(path))
    if i is None:
      return None
    r = self._source[i]
    if r["media"].decode() != self.paths[i]:
      raise VllamaError(f"media cache {self.directory}: record {i} is not {self.paths[i]!r}")
    audio = {}
    if "filterbanks" in r:
      audio = {"audio_broken": r["audio_broken"].decode(), "filterbanks": r["filterbanks"]}
    return CachedVideo(r["broken"].decode(), r["frames"], r["indices"], float(r["fps"]), **audio)
