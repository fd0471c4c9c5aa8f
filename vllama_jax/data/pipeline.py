"""grain input pipelines: records -> fixed-shape training batches, and per-step dataset mixing.

Graph per dataset: MapDataset(records) -> shard [i::n] -> shuffle + repeat (training) ->
map_with_index(SampleBuilder) -> to_iter_dataset(ReadOptions) -> batching (skips broken samples,
counting them) -> mp_prefetch (optional worker processes). The batching stage runs before
mp_prefetch, so with workers it runs there; each batch carries the counts of the samples skipped
while it was assembled ("_broken"), and `Loader` (main process) adds them up and removes the key.

Batch: ids / source / labels / attention_mask int32 (B, L), frames float32 (B, T, S, S, 3),
filterbanks float32 (B, 8, 1, 128, 204) with audio, weight float32 (B,); read from frozen features
(data.frozen_features), videos give frame_features (B, T, Nq, W) and audio_embeddings (B, 8, D)
instead of frames and filterbanks. L is the smallest
multiple of `cfg.bucket` that holds the batch's longest text. Training drops the last partial
batch; otherwise it is filled with filler rows (weight 0, labels -100, attention_mask 0).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Sequence

import grain
import numpy as np

from vllama_jax.data.samples import DataConfig, SampleBuilder
from vllama_jax.data.text import IGNORE
from vllama_jax.errors import ConfigError, NoUsableSample


def _shard(cfg: DataConfig) -> tuple[int, int]:
  if cfg.shard_index is not None and cfg.shard_count is not None:
    return cfg.shard_index, cfg.shard_count
  import jax
  return jax.process_index(), jax.process_count()


MEDIA = ("frames", "filterbanks", "frame_features", "audio_embeddings")


def collate(rows: list[dict], batch_size: int, buckets: Sequence[int]) -> dict:
  """Stacks examples into one fixed-shape batch, padding text right and rows with filler."""
  longest = max(len(r["ids"]) for r in rows)
  length = next((b for b in buckets if b >= longest), None)
  if length is None:
    raise ValueError(f"a text of {longest} tokens exceeds the largest bucket {buckets[-1]}")
  batch = {"ids": np.zeros((batch_size, length), np.int32),
           "source": np.full((batch_size, length), -1, np.int32),
           "labels": np.full((batch_size, length), IGNORE, np.int32),
           "attention_mask": np.zeros((batch_size, length), np.int32),
           "weight": np.zeros((batch_size,), np.float32)}
  media = [k for k in MEDIA if k in rows[0]]
  for k in media:
    batch[k] = np.zeros((batch_size,) + rows[0][k].shape, np.float32)
  for i, r in enumerate(rows):
    n = len(r["ids"])
    batch["ids"][i, :n] = r["ids"]
    batch["source"][i, :n] = r["source"]
    batch["labels"][i, :n] = r["labels"]
    batch["attention_mask"][i, :n] = 1
    batch["weight"][i] = 1.0
    for k in media:
      batch[k][i] = r[k]
  return batch


class _BatchIterator(grain.DatasetIterator):
  """Groups good examples into batches; broken ones are counted into the next batch's "_broken"
  (or, at the end of the data, into a last element holding only "_broken"). `give_up_after`
  broken records in a row (two passes over the shard: one whole shuffled epoch at least) raise
  NoUsableSample instead of reading the repeated data forever."""

  def __init__(self, parent, batch_size, buckets, drop_remainder, give_up_after, name):
    super().__init__(parent)
    self._batch_size, self._buckets, self._drop = batch_size, buckets, drop_remainder
    self._give_up_after, self._broken_run, self._name = give_up_after, Counter(), name

  def __next__(self):
    rows, broken = [], Counter()
    while len(rows) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        if rows and not self._drop:
          break
        if broken:
          return {"_broken": dict(broken)}
        raise
      if element["broken"]:
        broken[element["broken"]] += 1
        self._broken_run[element["broken"]] += 1
        if self._broken_run.total() >= self._give_up_after:
          raise NoUsableSample(
              f"dataset {self._name!r}: no usable sample in {self._broken_run.total()} records in a row, two "
              f"passes over this shard's {self._give_up_after // 2} records; skipped as {dict(self._broken_run)}: "
              "check the annotation file and the media directory")
      else:
        self._broken_run.clear()
        rows.append(element)
    return collate(rows, self._batch_size, self._buckets) | {"_broken": dict(broken)}

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _BatchDataset(grain.IterDataset):
  def __init__(self, parent, batch_size, buckets, drop_remainder, give_up_after, name):
    super().__init__(parent)
    self._args = (batch_size, tuple(buckets), drop_remainder, give_up_after, name)

  def __iter__(self):
    return _BatchIterator(self._parent.__iter__(), *self._args)


def dataset(records: Sequence[dict], tokenizer_dir: str, cfg: DataConfig, name: str = "") -> grain.IterDataset:
  """The grain graph of one dataset (iterate it through `Loader`); `name` is for its errors."""
  index, count = _shard(cfg)
  cfg = dataclasses.replace(cfg, shard_index=index, shard_count=count)
  builder = SampleBuilder(tokenizer_dir, cfg)
  if builder.features is not None:
    builder.features.require(records, train=cfg.train)
  step = cfg.bucket
  top = -(-builder.max_length() // step) * step
  buckets = tuple(range(step, top + 1, step))
  ds = grain.MapDataset.source(list(records))[index::count]
  if len(ds) == 0:
    raise ConfigError(f"dataset {name!r}: shard {index} of {count} holds no records ({len(records)} in all): "
                      "fewer records than processes")
  shard_size = len(ds)
  epochs = cfg.num_epochs if cfg.num_epochs is not None else (None if cfg.train else 1)
  if cfg.train:
    ds = ds.shuffle(seed=cfg.seed)
  if epochs != 1:
    ds = ds.repeat(epochs)
  ds = ds.map_with_index(builder)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                            prefetch_buffer_size=cfg.prefetch))
  it = _BatchDataset(it, cfg.batch_size, buckets, drop_remainder=cfg.train,
                     give_up_after=2 * shard_size, name=name)
  if cfg.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; a program without absl.app.run
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                     per_worker_buffer_size=2))
  return it


class Loader:
  """Iterator of batches with `counts` (broken samples by reason) and get_state/set_state."""

  def __init__(self, ds: grain.IterDataset, name: str = ""):
    self.name, self._it = name, iter(ds)
    self.counts: Counter = Counter()
    self.batches = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while True:
      element = next(self._it)
      self.counts.update(element.pop("_broken"))
      if "ids" in element:
        self.batches += 1
        return element

  def get_state(self) -> dict:
    return {"inner": self._it.get_state(), "counts": dict(self.counts), "batches": self.batches}

  def set_state(self, state: dict) -> None:
    self._it.set_state(state["inner"])
    self.counts = Counter(state["counts"])
    self.batches = state["batches"]

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def loader(records: Sequence[dict], tokenizer_dir: str, cfg: DataConfig, name: str = "") -> Loader:
  return Loader(dataset(records, tokenizer_dir, cfg, name), name)


class Mixer:
  """MultiIterLoader: each step draws one loader with probability proportional to its ratio
  (uniform without ratios) and takes a whole batch from it. The draw of step k depends only on
  (seed, k), so a restored state continues identically, and every process makes the same draw.
  The reference's GPUs draw independently; one SPMD step has one media shape (an image batch has
  1 frame, a video batch 8), so here the whole global batch comes from one draw. Each dataset's
  share of the samples is the same."""

  def __init__(self, loaders: Sequence[Loader], ratios: Sequence[float] | None = None,
               seed: int = 0):
    if ratios is not None and len(ratios) != len(loaders):
      raise ValueError(f"{len(ratios)} ratios for {len(loaders)} datasets")
    p = np.ones(len(loaders)) if ratios is None else np.asarray(ratios, np.float64)
    if np.any(p < 0) or p.sum() <= 0:
      raise ValueError(f"ratios must be non-negative with a positive sum, got {ratios}")
    self.loaders, self.p, self.seed = list(loaders), p / p.sum(), seed
    self.step, self.last = 0, None

  def choose(self, step: int) -> int:
    return int(np.random.default_rng([self.seed, step]).choice(len(self.loaders), p=self.p))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    k = self.choose(self.step)
    batch = next(self.loaders[k])
    self.step, self.last = self.step + 1, k
    return batch

  @property
  def counts(self) -> dict:
    return {l.name or str(i): dict(l.counts) for i, l in enumerate(self.loaders)}

  def get_state(self) -> dict:
    return {"step": self.step, "loaders": [l.get_state() for l in self.loaders],
            "names": [l.name for l in self.loaders]}

  def set_state(self, state: dict) -> None:
    names = [l.name for l in self.loaders]
    if state.get("names", names) != names or len(state["loaders"]) != len(names):
      raise ConfigError(f"the saved data position is for the datasets {state.get('names')}, the config has "
                        f"{names}; resume with the datasets of the run, or start a new workdir")
    self.step = state["step"]
    for l, s in zip(self.loaders, state["loaders"]):
      l.set_state(s)

  def close(self) -> None:
    for l in self.loaders:
      l.close()


def mix(loaders: Sequence[Loader], ratios: Sequence[float] | None = None, seed: int = 0) -> Mixer:
  return Mixer(loaders, ratios, seed)
