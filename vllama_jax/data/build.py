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
from vllama_jax.data.pipeline import Mixer, loader
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
FROM_ELSEWHERE = {"template", "audio", "video", "train", "seed"}  # DataConfig fields set from the config's top level
DATA_KEYS = (DATA_FIELDS - FROM_ELSEWHERE) | {"datasets", "batch_per_device", "eval_batch_size"}
# The counts a pipeline takes, with their least value.
COUNT_KEYS = {"batch_size": 1, "eval_batch_size": 1, "num_frames": 1, "size": 1, "num_query_tokens": 1,
              "max_txt_len": 1, "max_len": 1, "bucket": 1, "num_workers": 0, "num_threads": 1, "prefetch": 0}
DATASET_KEYS = {"name", "format", "ann", "media", "ratio", "eval_ann", "eval_media"}
EXPECTED = {
    "webvid": "a folder of *.csv files with the columns videoid, page_dir, name",
    "image_caption": 'a JSON file {"annotations": [{"image_id": ..., "caption": ...}, ...]}',
    "llava": 'a JSON list [{"image": ..., "conversations": [{"from": ..., "value": ...}, ...]}, ...]',
    "videochat": 'a JSON list [{"video": ..., "QA": [{"q": ..., "a": ...}, ...]}, ...]',
}


def _name(spec) -> str:
  return spec.get("name") or spec.get("format", "?")


def check_datasets(config, train: bool) -> None:
  """The `data.datasets` entries: known keys and formats, the paths they need, usable ratios, and
  distinct names (skipped-sample counts and held-out losses are kept per name)."""
  names = [_name(spec) for spec in config.data.datasets]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ConfigError(f"data.datasets: {twice[0]!r} names datasets {[i for i, n in enumerate(names) if n == twice[0]]}; "
                      "give each a distinct `name` (a dataset without one is named by its format)")
  for i, spec in enumerate(config.data.datasets):
    where = f"data.datasets.{i} ({_name(spec)!r})"
    unknown = sorted(set(spec) - DATASET_KEYS)
    if unknown:
      raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(DATASET_KEYS)}")
    if spec.get("format") not in READERS:
      raise ConfigError(f"{where}: unknown format {spec.get('format')!r}; expected one of {sorted(READERS)}")
    missing = [k for k in ("ann", "media") if k not in spec]
    if missing:
      raise ConfigError(f"{where}: has no {missing} (the annotations and the media folder)")
    ratio = spec.get("ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0:
      raise ConfigError(f"{where}: ratio must be a number >= 0, got {ratio!r}")
    n = config.data.get("num_frames", 8)
    if train and spec["format"] == "webvid" and n % 2:
      raise ConfigError(f"{where}: WebVid's head/tail frame sampling draws num_frames / 2 from each half of a "
                        f"video; data.num_frames must be even, got {n}")


def records_of(spec, train: bool) -> list[dict]:
  """The records of a dataset's training (or held-out) annotations; [] when it has none set."""
  fmt = spec["format"]
  ann, media = (spec["ann"], spec["media"]) if train else (spec.get("eval_ann"), spec.get("eval_media"))
  if not ann:
    return []
  try:
    records = READERS[fmt](ann, media or spec["media"])
  except (OSError, ValueError) as e:  # JSON and text decoding errors are ValueErrors
    detail = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
    raise ConfigError(f"dataset {_name(spec)!r}: cannot read {ann!r} ({detail}); expected {EXPECTED[fmt]}") from None
  if not records:
    raise ConfigError(f"dataset {_name(spec)!r}: {ann!r} holds no annotations; expected {EXPECTED[fmt]}")
  return records


def data_config(config, train: bool) -> DataConfig:
  """`data.batch_size` / `eval_batch_size` are what each process feeds, or, with
  `data.batch_per_device` (the stage recipes, whose reference figures are per GPU), what each of
  its local devices gets."""
  d = config.data
  unknown = sorted(set(d) - DATA_KEYS)
  if unknown:
    raise ConfigError(f"data: unknown key(s) {unknown}; known keys: {sorted(DATA_KEYS)}"
                      + (" (the seed is the config's top-level seed)" if "seed" in unknown else ""))
  if config.template not in TEMPLATES:
    raise ConfigError(f"template {config.template!r}: expected one of {sorted(TEMPLATES)}")
  for key, least in COUNT_KEYS.items():
    value = d.get(key, least)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ConfigError(f"data.{key} must be an integer >= {least}, got {value!r}")
  check_datasets(config, train)
  fields = {k: d[k] for k in DATA_FIELDS - FROM_ELSEWHERE if k in d}
  fields["template"] = TEMPLATES[config.template]
  fields["audio"] = config.mode in ("audio", "audio_video")
  fields["video"] = config.mode != "audio"
  fields["train"] = train
  fields["seed"] = int(config.get("seed", 0))
  fields["prompts"] = tuple(d.get("prompts", ()))
  if not train:
    fields["batch_size"] = d.get("eval_batch_size", d.batch_size)
  if d.get("batch_per_device", False):
    import jax
    fields["batch_size"] *= jax.local_device_count()
  return DataConfig(**fields)


def read_datasets(config, train: bool = True) -> list[tuple[dict, list[dict]]]:
  """(dataset entry, its records) of every dataset the loader reads (an entry with ratio 0 is left
  out of training). Reading the annotation files is what fails on a wrong path or file: a run does it
  before its model loads."""
  out = []
  for i, spec in enumerate(config.data.datasets):
    if train and spec.get("ratio", 1.0) <= 0:
      continue
    if train and not spec["ann"]:
      raise ConfigError(f"data.datasets.{i} ({_name(spec)!r}): its annotations are not set; set them "
                        f"(--config.data.datasets.{i}.ann=... and .media=...) or leave the dataset out of "
                        f"training with --config.data.datasets.{i}.ratio=0")
    records = records_of(spec, train)
    if records:
      out.append((spec, records))
  if not out and train:
    raise ConfigError("no dataset has training annotations")
  if not out:
    raise ConfigError("no dataset has held-out annotations (data.datasets.<i>.eval_ann), which evaluation "
                      "reads; set them, or turn evaluation off with --config.eval.every=0")
  return out


def make_loader(config, train: bool = True, datasets: list | None = None) -> Mixer:
  """The mixed training loader (train=False: a Mixer over the held-out loaders; `evaluate` reads
  its `loaders` one after the other); `datasets`: what `read_datasets` returned, if it ran."""
  cfg = data_config(config, train)
  if cfg.features_dir:
    from vllama_jax.data.frozen_features import FrozenFeatures
    FrozenFeatures(cfg.features_dir).check_weights(config.init_dir)
  datasets = read_datasets(config, train) if datasets is None else datasets
  loaders = [loader(records, config.init_dir, cfg, name=_name(spec)) for spec, records in datasets]
  return Mixer(loaders, [float(spec.get("ratio", 1.0)) for spec, _ in datasets], seed=config.seed)
