"""Build the media cache of a training config's videos (training and held-out annotations):

  python -m vllama_jax.data.cache --config configs/X.py[:variant] --out DIR [--pool uniform|all|FPS]
      [--audio_dtype float32|float16] [--threads N] [--config.key=value ...]

then train with `--config.data.cache_dir=DIR`. Frame count, size and audio come from the config
(`data.num_frames`, `data.size`, `mode`); see vllama_jax.data.media_cache for what the pool means.
"""

from __future__ import annotations

import argparse
import sys
import time

from vllama_jax.data.build import data_config, records_of
from vllama_jax.errors import VllamaError


def video_paths(config) -> list[str]:
  """Every video the config's datasets name (training and held-out), broken records left out."""
  paths = set()
  for spec in config.data.datasets:
    for train in (True, False):
      paths.update(r["media"] for r in records_of(spec, train)
                   if not r["broken"] and r["media_type"] == "video")
  return sorted(paths)


def main(argv=None) -> int:
  from vllama_jax.cli import CONFIG_HELP, parse_config_args, positive_int
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m vllama_jax.data.cache", description=__doc__.split("\n")[0],
                                   epilog=CONFIG_HELP)
  parser.add_argument("--out", required=True, help="directory to write the cache into")
  parser.add_argument("--pool", default="uniform", help="frames kept per video: uniform, all or an fps")
  parser.add_argument("--audio_dtype", default="float32", choices=("float32", "float16"))
  parser.add_argument("--threads", type=positive_int, default=2, help="videos decoded at once")
  if {"-h", "--help"} & set(argv):
    parser.print_help()
    return 0
  try:
    config, rest = parse_config_args(argv, "")
    args = parser.parse_args(rest)
    from vllama_jax.data.media_cache import MediaCache, build_cache
    cfg = data_config(config, train=True)
    paths = video_paths(config)
    if not paths:
      raise VllamaError("the config's datasets name no video (are data.datasets.<i>.ann and .media set?)")
    start = time.time()
    directory = build_cache(paths, args.out, num_frames=cfg.num_frames, size=cfg.size, audio=cfg.audio,
                            pool=args.pool, audio_dtype=args.audio_dtype, num_threads=args.threads)
  except (VllamaError, OSError) as e:  # bad config, missing annotations
    print(f"error: {e}", file=sys.stderr)
    return 2
  cache = MediaCache(directory)
  print(f"{len(cache)} videos in {directory} ({time.time() - start:.1f} s), broken: "
        f"{cache.broken or 'none'}; train with --config.data.cache_dir={args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
