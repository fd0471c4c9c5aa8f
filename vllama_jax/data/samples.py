"""One record -> one training example (media arrays + text arrays), or a broken marker."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vllama_jax.data import augment, text
from vllama_jax.data.decode import load_video_indices
from vllama_jax.errors import ConfigError
from vllama_jax.media import MediaError

AUDIO_ROWS = 8
SKIPPED = (ValueError, OSError, KeyError, TypeError)  # what a broken sample may raise


def skip_reason(error: Exception, media: str) -> str:
  """The counter a sample that raised `error` (one of SKIPPED) is skipped under."""
  if isinstance(error, text.BrokenSample):
    return error.reason
  if isinstance(error, MediaError):
    return "corrupt media" if media and os.path.isfile(media) else "missing file"
  return "bad sample"


@dataclass(frozen=True)
class DataConfig:
  """What a dataset pipeline produces. `num_query_tokens` is N of the branch (32 VL, 8 AL);
  `audio` adds filterbanks and 8 audio rows in front (joint audio+video); `prompts` are the
  caption-path prompts, already formatted with the template, each with one `<ImageHere>`."""
  batch_size: int = 4
  num_frames: int = 8
  size: int = 224
  train: bool = True
  seed: int = 0
  num_query_tokens: int = 32
  audio: bool = False
  video: bool = True  # False: only the audio rows reach the LLM (mode "audio")
  template: str = "vicuna"  # instruction datasets: "vicuna" or "llama_v2"
  prompts: tuple[str, ...] = ()
  end_sym: str = "\n"
  max_txt_len: int = 32
  max_len: int = 512  # instruction datasets' tokenizer cut
  bucket: int = 64  # text lengths are padded to a multiple of this
  overshoot: str = "wrap"  # the uint8 cast after the video crop: "wrap" (reference) or "clip"
  augment: bool = True  # random-resized crops when training (the reference always crops)
  num_epochs: int | None = None  # None: forever when training, once otherwise
  shard_index: int | None = None  # None: jax.process_index()
  shard_count: int | None = None  # None: jax.process_count()
  num_workers: int = 0  # worker processes (grain mp_prefetch); 0: none
  num_threads: int = 2  # reading threads per process (grain ReadOptions)
  prefetch: int = 8  # elements read ahead per process
  cache_dir: str = ""  # a media cache (data.media_cache) to read videos' frames and filterbanks from
  features_dir: str = ""  # frozen features (data.frozen_features) to read in place of videos' media

  def __post_init__(self):
    if self.overshoot not in ("wrap", "clip"):
      raise ConfigError(f"data.overshoot must be 'wrap' or 'clip', got {self.overshoot!r}")
    bad = [p for p in self.prompts if p.count(text.PLACEHOLDER) != 1]
    if bad:
      raise ConfigError(f"data.prompts: each prompt needs exactly one {text.PLACEHOLDER} (where the media "
                        f"tokens go); {bad[0]!r} has {bad[0].count(text.PLACEHOLDER)}")

  @property
  def runs(self) -> tuple[int, ...]:
    return ((AUDIO_ROWS,) if self.audio else ()) + ((self.num_query_tokens,) if self.video else ())

  @property
  def kinds(self) -> tuple[str, ...]:
    """The modality of each run of `runs`."""
    return (("audio",) if self.audio else ()) + (("video",) if self.video else ())


class SampleBuilder:
  """Picklable record -> example function (the tokenizer and the media cache are reopened in each
  worker process)."""

  def __init__(self, tokenizer_dir: str, cfg: DataConfig):
    self.tokenizer_dir, self.cfg, self._tok, self._cache, self._features = tokenizer_dir, cfg, None, None, None
    if cfg.cache_dir:  # opened here too, so that a cache that does not fit fails at once
      self.cache.check(cfg.num_frames, cfg.size, cfg.audio)
    if cfg.features_dir:
      if cfg.train and cfg.augment:
        raise ConfigError(f"data.features_dir {cfg.features_dir!r}: frozen features hold the un-augmented "
                          "frames' encodings; training from them needs data.augment=False")
      self.features.check(cfg.num_frames, cfg.size, cfg.audio)

  def __getstate__(self):
    return {"tokenizer_dir": self.tokenizer_dir, "cfg": self.cfg, "_tok": None, "_cache": None, "_features": None}

  @property
  def features(self):
    if self._features is None and self.cfg.features_dir:
      from vllama_jax.data.frozen_features import FrozenFeatures
      self._features = FrozenFeatures(self.cfg.features_dir)
    return self._features

  @property
  def cache(self):
    if self._cache is None and self.cfg.cache_dir:
      from vllama_jax.data.media_cache import MediaCache
      self._cache = MediaCache(self.cfg.cache_dir)
    return self._cache

  @property
  def tokenizer(self):
    if self._tok is None:
      from vllama_jax.text.tokenizer import Tokenizer
      self._tok = Tokenizer(self.tokenizer_dir)
      self._tok.add_tokens([text.PLACEHOLDER])
    return self._tok

  def __call__(self, index: int, record: dict) -> dict:
    try:
      return self.build(index, record)
    except SKIPPED as e:
      return {"broken": skip_reason(e, record.get("media", ""))}

  def max_length(self) -> int:
    """The longest text a sample can have."""
    cfg = self.cfg
    if cfg.prompts:
      wrap = max(len(self.tokenizer.encode(b)) + len(self.tokenizer.encode(a))
                 for b, a in (p.split(text.PLACEHOLDER) for p in cfg.prompts))
    else:
      wrap = 0
    return max(cfg.max_len, 1 + wrap + sum(cfg.runs) + cfg.max_txt_len)

  def build(self, index: int, record: dict) -> dict:
    cfg = self.cfg
    if record.get("broken"):
      raise text.BrokenSample(record["broken"])
    rng = np.random.default_rng([cfg.seed, cfg.shard_index or 0, index])
    if record["kind"] == "caption":  # cheap text checks before decoding
      caption = record["caption"]
      caption = text.blip_caption(caption) if record.get("clean_caption") else caption
      if not caption.strip():
        raise text.BrokenSample("empty caption")
    elif record["kind"] == "llava":  # its text needs nothing from the image: a broken one costs no decoding
      ex = self.instruction(text.llava_turns(record["conversations"], cfg.runs))
    if record["media_type"] == "video" and self.features is not None:
      media, hint = self.features.arrays(record["media"])
    else:
      media, hint = self.media(record, rng)
    if record["kind"] == "caption":
      prompt = cfg.prompts[int(rng.integers(len(cfg.prompts)))] if cfg.prompts else None
      ex = text.caption_example(self.tokenizer, caption, cfg.runs, prompt, cfg.end_sym, cfg.max_txt_len)
    elif record["kind"] == "videochat":  # the first question holds the decoded video's time hint
      ex = self.instruction(text.videochat_turns(record["qa"], hint if cfg.video else "", cfg.runs, cfg.kinds))
    return {"broken": ""} | media | ex

  def instruction(self, turns) -> dict:
    cfg = self.cfg
    return text.instruction_example(self.tokenizer, turns, cfg.template, cfg.runs, cfg.max_len)

  def media(self, record: dict, rng) -> tuple[dict, str]:
    """({"frames", and "filterbanks" with audio}, time hint) of a record's video or image. Without
    cfg.video (mode "audio") a video's frames reach nothing, so they are neither decoded nor batched."""
    out, hint = {}, ""
    video = record["media_type"] == "video"
    cached = self.cache.get(record["media"]) if video and self.cache is not None else None
    if cached is not None and cached.broken:  # the cache decoded no audio either
      raise text.BrokenSample(cached.broken)
    if not video:
      out["frames"] = self.image(record["media"], rng)
    elif self.cfg.video:
      out["frames"], hint = self.video(record["media"], rng, record["kind"] == "caption", cached)
    if self.cfg.audio:
      if cached is not None:
        if cached.audio_broken:
          raise text.BrokenSample(cached.audio_broken)
        bank = cached.filterbanks
      else:
        from vllama_jax.media.audio import audio_features
        bank = audio_features(record["media"])
      if bank is None:
        raise text.BrokenSample("no audio")
      out["filterbanks"] = bank.astype(np.float32)
    return out, hint

  def video(self, path, rng, headtail: bool, cached=None):
    from vllama_jax.media.image import normalize
    from vllama_jax.media.video import sample_indices, time_hint
    n = self.cfg.num_frames

    def choose(count):
      if count < n:
        raise text.BrokenSample("short video", f"{count} frames, {n} needed")
      if headtail and self.cfg.train:
        return augment.headtail_indices(rng, count, n)
      return sample_indices(count, n)
    if cached is None:
      frames, indices, fps = load_video_indices(path, choose, self.cfg.size)
    else:  # the same choice over the cached pool (see data.media_cache)
      frames, indices, fps = cached.frames_at(choose)
    if self.cfg.train and self.cfg.augment:
      frames = augment.crop_video(frames, rng, self.cfg.size, self.cfg.overshoot)
    return normalize(frames), time_hint(indices, fps)

  def image(self, path, rng):
    from PIL import Image
    from vllama_jax.media.image import normalize
    if not os.path.isfile(path):
      raise MediaError(f"{path}: no such image file")
    try:
      with Image.open(path) as opened:
        image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise MediaError(f"{path}: cannot decode as an RGB image ({e})") from e
    size = self.cfg.size
    if self.cfg.train and self.cfg.augment:
      rgb = augment.crop_image(image, rng, size)
    else:
      rgb = np.asarray(image.resize((size, size), Image.BICUBIC))
    return normalize(rgb)[None]
