"""Ahead-of-time outputs of the frozen encoders: what the trainable Q-Formers see, computed once.

  python -m vllama_jax.data.frozen_features --config configs/X.py[:variant] --out DIR [--config.key=value ...]

then train with `--config.data.features_dir=DIR --config.data.augment=false` (the config's init_dir
names the encoders; a data.cache_dir media cache, if set, is read instead of decoding).

When nothing random touches a video (instruction data, whose frames are sampled uniformly, and
data.augment=False), what the frozen encoders make of it is the same at every step. `build_features`
runs them once over every video of a config's datasets and training with `data.features_dir` reads
the results in place of frames and filterbanks, so that a step runs only what trains:

  frame_features    float32 (N, T, Nq, W)  the image Q-Former's outputs (VideoBranch.frame_features)
  audio_embeddings  float32 (N, 8, D)      ImageBind's audio embeddings (with audio)

The directory holds index.json (settings, a fingerprint of the frozen weights, and per video its
path, why it is broken or "", and its time hint) and one memory-mapped .npy per array. Images are
not covered (they go through the encoders as before), nor are captioned videos when training (the
reference draws their frames at random).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vllama_jax.convert.output import write_atomically
from vllama_jax.data import text
from vllama_jax.data.samples import SKIPPED, SampleBuilder, skip_reason
from vllama_jax.errors import ConfigError, VllamaError

INDEX = "index.json"
FROZEN = {"video": ("video_branch.visual_encoder.", "video_branch.qformer."), "audio": ("audio_branch.audio_encoder.",)}
MODES = ("video", "audio", "audio_video")  # audio_vision feeds frames to ImageBind's vision tower: not covered


def fingerprint(init_dir: str, video: bool, audio: bool) -> str:
  """A digest of the frozen encoders' parameter files in `init_dir` (names, sizes, modification times)."""
  from vllama_jax.pretrained import PARAMS_DIR
  params = os.path.join(init_dir, PARAMS_DIR)
  if not os.path.isdir(params):
    raise ConfigError(f"{params}: no such directory; frozen features need the run's start directory")
  prefixes = (FROZEN["video"] if video else ()) + (FROZEN["audio"] if audio else ())
  digest = hashlib.sha256()
  for name in sorted(n for n in os.listdir(params) if n.startswith(prefixes)):
    for root, dirs, files in os.walk(os.path.join(params, name), followlinks=True):
      dirs.sort()
      for f in sorted(files):
        st = os.stat(os.path.join(root, f))
        digest.update(f"{os.path.relpath(os.path.join(root, f), params)}:{st.st_size}:{st.st_mtime_ns};".encode())
  return digest.hexdigest()[:16]


def _settings(config) -> dict:
  from vllama_jax.data.build import data_config
  if config.mode not in MODES:
    raise ConfigError(f"frozen features cover modes {MODES}, not {config.mode!r}")
  cfg = data_config(config, train=False)
  video, audio = config.mode != "audio", cfg.audio
  return dict(num_frames=cfg.num_frames, size=cfg.size, video=video, audio=audio,
              weights=fingerprint(config.init_dir, video, audio))


def build_features(config, out_dir: str, *, batch_size: int = 16, num_threads: int = 2) -> str:
  """Writes the frozen features of every video the config's datasets name (training and held-out)
  into `out_dir`, from the encoders of `config.init_dir`; a no-op when it already holds them.
  Returns `out_dir`."""
  from vllama_jax.data.build import data_config
  from vllama_jax.data.cache import video_paths
  from vllama_jax.pretrained import load_audio_branch, load_video_branch
  settings, paths = _settings(config), sorted({os.path.normpath(p) for p in video_paths(config)})
  if os.path.isfile(os.path.join(out_dir, INDEX)):
    existing = FrozenFeatures(out_dir)
    if existing.settings != settings or existing.paths != paths:
      raise ConfigError(f"{out_dir} already holds frozen features of other settings, weights or videos "
                        f"({existing.settings}, {len(existing.paths)} videos); remove it or choose another "
                        "directory")
    return out_dir
  builder = SampleBuilder(config.init_dir, dataclasses.replace(data_config(config, train=False), features_dir=""))
  encoders = {}  # output -> (SampleBuilder.media's input, jitted frozen encoder)
  if settings["video"]:
    encoders["frame_features"] = ("frames", _jitted(load_video_branch(config.init_dir),
                                                    lambda branch, frames: branch.frame_features(frames)))
  if settings["audio"]:
    encoders["audio_embeddings"] = ("filterbanks", _jitted(load_audio_branch(config.init_dir, vision=None, train_on="audio"),
                                                           lambda branch, banks: branch.audio_encoder(banks)))

  def load(path):
    try:
      media, hint = builder.media({"media": path, "media_type": "video", "kind": "videochat"}, rng=None)
      return "", hint, media
    except SKIPPED as e:
      return skip_reason(e, path), "", {}

  os.makedirs(out_dir, exist_ok=True)
  arrays: dict[str, np.ndarray] = {}
  entries = []
  with ThreadPoolExecutor(num_threads) as pool:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      loaded = list(pool.map(load, chunk))
      entries += [{"media": p, "broken": broken, "time_hint": hint} for p, (broken, hint, _) in zip(chunk, loaded)]
      good = [i for i, (broken, _, _) in enumerate(loaded) if not broken]
      if not good:
        continue
      for key, (inputs, encode) in encoders.items():
        x = np.stack([loaded[i][2][inputs] for i in good])
        x = np.concatenate([x, np.zeros((batch_size - len(good),) + x.shape[1:], x.dtype)])  # one shape: one compile
        y = np.asarray(encode(x), np.float32)[:len(good)]
        if key not in arrays:
          arrays[key] = np.lib.format.open_memmap(os.path.join(out_dir, key + ".npy"), "w+", np.float32,
                                                  (len(paths),) + y.shape[1:])
        arrays[key][[start + i for i in good]] = y
  for a in arrays.values():
    a.flush()
  broken: dict[str, int] = {}
  for e in entries:
    if e["broken"]:
      broken[e["broken"]] = broken.get(e["broken"], 0) + 1
  write_atomically(os.path.join(out_dir, INDEX),  # written last: complete
                   json.dumps({"settings": settings, "broken": broken, "videos": entries}))
  return out_dir


def _jitted(module, fn):
  """`fn(module, x)` jitted with the module's parameters as an argument (not baked in as constants)."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(module)
  compiled = jax.jit(lambda state, x: fn(nnx.merge(graphdef, state), x))
  return lambda x: compiled(state, x)


class FrozenFeatures:
  """Reads a directory written by `build_features`."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX)
    if not os.path.isfile(index):
      raise ConfigError(f"data.features_dir {directory!r} holds no frozen features ({INDEX} is missing; "
                        "build them with vllama_jax.data.frozen_features.build_features)")
    with open(index) as f:
      meta = json.load(f)
    self.directory, self.settings, self.broken = directory, meta["settings"], meta["broken"]
    self.paths = [e["media"] for e in meta["videos"]]
    self._entries = {e["media"]: (i, e) for i, e in enumerate(meta["videos"])}
    self._arrays = {k: np.load(os.path.join(directory, k + ".npy"), mmap_mode="r")
                    for k in ("frame_features", "audio_embeddings") if os.path.isfile(os.path.join(directory, k + ".npy"))}

  def check(self, num_frames: int, size: int, audio: bool) -> None:
    s = self.settings
    if (s["num_frames"], s["size"]) != (num_frames, size) or s["audio"] != audio:
      raise ConfigError(f"frozen features {self.directory} hold {s['num_frames']} frames of {s['size']} px"
                        f"{' with' if s['audio'] else ' without'} audio; the data config needs {num_frames} "
                        f"frames of {size} px{' with' if audio else ' without'} audio")

  def computed_from(self, init_dir: str) -> bool:
    """Whether these features are of the frozen encoder weights now in `init_dir`."""
    s = self.settings
    return fingerprint(init_dir, s["video"], s["audio"]) == s["weights"]

  def check_weights(self, init_dir: str) -> None:
    if not self.computed_from(init_dir):
      raise ConfigError(f"frozen features {self.directory} were computed from other frozen encoder weights than "
                        f"those in {init_dir}; build them again")

  def require(self, records, train: bool) -> None:
    """ConfigError unless every video record can be read from here."""
    videos = [r for r in records if r.get("media_type") == "video" and not r.get("broken")]
    if train and any(r["kind"] == "caption" for r in videos):
      raise ConfigError(f"data.features_dir {self.directory!r}: captioned videos draw random frames when "
                        "training, which frozen features cannot hold; train them without features_dir")
    missing = [r["media"] for r in videos if os.path.normpath(r["media"]) not in self._entries]
    if missing:
      raise ConfigError(f"frozen features {self.directory} lack {len(missing)} of the data's videos (e.g. "
                        f"{missing[0]}); build them again for these annotations")

  def arrays(self, path: str) -> tuple[dict, str]:
    """({"frame_features", and "audio_embeddings" with audio}, time hint) of a video, as
    SampleBuilder.media gives frames and filterbanks; BrokenSample for the videos it skips."""
    i, entry = self._entries[os.path.normpath(path)]
    if entry["broken"]:
      raise text.BrokenSample(entry["broken"])
    return {k: np.asarray(a[i]) for k, a in self._arrays.items()}, entry["time_hint"]


def main(argv=None) -> int:
  from vllama_jax.cli import CONFIG_HELP, parse_config_args, positive_int
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m vllama_jax.data.frozen_features",
                                   description=__doc__.split("\n")[0],
                                   epilog=CONFIG_HELP)
  parser.add_argument("--out", required=True, help="directory to write the features into")
  parser.add_argument("--batch_size", type=positive_int, default=16, help="videos encoded at once")
  if {"-h", "--help"} & set(argv):
    parser.print_help()
    return 0
  try:
    config, rest = parse_config_args(argv, "")
    args = parser.parse_args(rest)
    start = time.time()
    directory = build_features(config, args.out, batch_size=args.batch_size)
  except (VllamaError, OSError) as e:  # bad config, missing annotations or start directory
    print(f"error: {e}", file=sys.stderr)
    return 2
  stored = FrozenFeatures(directory)
  print(f"{len(stored.paths)} videos in {directory} ({time.time() - start:.1f} s), broken: "
        f"{stored.broken or 'none'}; train with --config.data.features_dir={directory} --config.data.augment=false")
  return 0


if __name__ == "__main__":
  sys.exit(main())
