"""A training config's `data` section -> the mixed loader of its datasets.

  data.datasets = [{"name": "webvid", "format": "webvid", "ann": "anno/", "media": "videos/",
                    "ratio": 100, "eval_ann": "", "eval_media": ""}, ...]

Formats: "webvid" (CSV dir), "image_caption" (cc_sbu_align / CC595k JSON), "llava" (LLaVA-150k
JSON), "videochat" (VideoChat-11k JSON). Training draws one dataset per step with probability
proportional to its ratio; evaluation reads every dataset's `eval_ann` once, one after the other.
"""

from __future__ import annotations

import dataclasses

from vllama_jax.data import formats
from vllama_jax.data.pipeline import Loader, Mixer, loader
from vllama_jax.data.samples import DataConfig
from vllama_jax.errors import ConfigError

READERS = {
    "webvid": formats.webvid_records,
    "image_caption": formats.image_caption_records,
    "llava": formats.llava_records,
    "videochat": formats.videochat_records,
}
# Our template names (text.conversation) -> the data module's (the reference's model_type).
TEMPLATES = {"vicuna": "vicuna", "llama_2": "llama_v2"}
DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}


def records_of(spec, train: bool) -> list[dict]:
  fmt = spec["format"]
  if fmt not in READERS:
    raise ConfigError(f"dataset {spec.get('name', fmt)!r}: unknown format {fmt!r}; expected one of "
                      f"{sorted(READERS)}")
  ann, media = (spec["ann"], spec["media"]) if train else (spec.get("eval_ann"), spec.get("eval_media"))
  if not ann:
    return []
  return READERS[fmt](ann, media or spec["media"])


def data_config(config, train: bool) -> DataConfig:
  """`data.batch_size` / `eval_batch_size` are what each process feeds, or, with
  `data.batch_per_device` (the stage recipes, whose reference figures are per GPU), what each of
  its local devices gets."""
  d = config.data
  fields = {k: d[k] for k in DATA_FIELDS if k in d}
  fields["template"] = TEMPLATES.get(config.template, config.template)
  fields["audio"] = config.mode in ("audio", "audio_video")
  fields["train"] = train
  fields["prompts"] = tuple(d.get("prompts", ()))
  if not train:
    fields["batch_size"] = d.get("eval_batch_size", d.batch_size)
  if d.get("batch_per_device", False):
    import jax
    fields["batch_size"] *= jax.local_device_count()
  return DataConfig(**fields)


def make_loader(config, train: bool = True) -> Mixer:
  """The mixed training loader (train=False: a Mixer over the held-out loaders; `evaluate` reads
  its `loaders` one after the other)."""
  cfg = data_config(config, train)
  if cfg.features_dir:
    from vllama_jax.data.frozen_features import FrozenFeatures
    FrozenFeatures(cfg.features_dir).check_weights(config.init_dir)
  loaders: list[Loader] = []
  ratios = []
  for spec in config.data.datasets:
    records = records_of(spec, train)
    if records:
      loaders.append(loader(records, config.init_dir, cfg, name=spec.get("name", spec["format"])))
      ratios.append(float(spec.get("ratio", 1.0)))
  if not loaders:
    raise ConfigError("no dataset has " + ("training" if train else "held-out (eval_ann)") + " annotations")
  return Mixer(loaders, ratios, seed=config.seed)
