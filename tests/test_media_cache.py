"""The ahead-of-time media cache: cached frames and filterbanks are the decoded ones, broken media
keep their reasons, and batches read through the cache equal the decoding path's."""

import json
import os
import pickle
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from video_fixtures import synthetic_with_broken_videos  # noqa: E402

from vllama_jax.data import DataConfig, SampleBuilder, loader, videochat_records, webvid_records  # noqa: E402
from vllama_jax.data.decode import load_video_indices  # noqa: E402
from vllama_jax.data.media_cache import MediaCache, build_cache, pool_indices  # noqa: E402
from vllama_jax.errors import ConfigError  # noqa: E402
from vllama_jax.media.audio import audio_features  # noqa: E402
from vllama_jax.media.video import sample_indices, time_hint  # noqa: E402
from vllama_jax.random_checkpoint import write_tokenizer  # noqa: E402

S = 64
BASE = dict(batch_size=2, size=S, num_query_tokens=4, shard_index=0, shard_count=1, num_threads=2,
            prefetch=2, augment=False)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp("media")
  tok = str(root / "tok")
  write_tokenizer(tok)
  videos, names = synthetic_with_broken_videos(root / "syn")
  qa = [{"video": f"train/{n}.mp4", "QA": [{"q": "What?", "a": f"It is {n}."}]} for n in names]
  (root / "qa.json").write_text(json.dumps(qa))
  (root / "anno").mkdir()
  rows = "".join(f"{n},train,A clip {n}.\n" for n in names)
  (root / "anno" / "a.csv").write_text("videoid,page_dir,name\n" + rows)
  qa = videochat_records(str(root / "qa.json"), str(videos))
  captions = webvid_records(str(root / "anno"), str(videos))
  return root, tok, qa, captions


@pytest.fixture(scope="module")
def uniform_cache(media):
  root, _, qa, _ = media
  return build_cache([r["media"] for r in qa], str(root / "uniform"), num_frames=8, size=S, audio=True)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cached_media_equal_decoded(media, uniform_cache):
  _, _, qa, _ = media
  cache = MediaCache(uniform_cache)
  assert len(cache) == 8 and cache.settings["pool"] == "uniform"
  assert cache.broken == {"missing file": 1, "corrupt media": 1, "short video": 1, "no audio": 1}
  for r in qa[:4]:
    got = cache.get(r["media"])
    frames, indices, fps = load_video_indices(r["media"], lambda c: sample_indices(c, 8), S)
    assert got.broken == got.audio_broken == "" and got.frames.dtype == np.uint8
    np.testing.assert_array_equal(got.frames, frames)
    assert got.indices.tolist() == indices and got.fps == fps
    np.testing.assert_array_equal(got.filterbanks, audio_features(r["media"]))
    assert cache._source[cache._index[r["media"]]]["time_hint"].decode() == time_hint(indices, fps)
  by_name = {os.path.basename(r["media"])[:-4]: cache.get(r["media"]) for r in qa[4:]}
  assert {k: (v.broken, v.audio_broken) for k, v in by_name.items()} == {
      "missing": ("missing file", ""), "bad": ("corrupt media", ""), "short": ("short video", ""),
      "silent": ("", "no audio")}
  assert cache.get("elsewhere.mp4") is None
  # the same directory and settings again: nothing to do; other settings: an error, nothing lost
  paths = [r["media"] for r in qa]
  assert build_cache(paths, os.path.dirname(os.path.dirname(uniform_cache)), num_frames=8, size=S,
                     audio=True) == uniform_cache
  with pytest.raises(ConfigError, match="other settings"):
    build_cache(paths, os.path.dirname(os.path.dirname(uniform_cache)), num_frames=4, size=S, audio=True)


def test_batches_through_cache_equal_decoding(media, uniform_cache):
  _, tok, qa, _ = media
  runs = []
  for cache_dir in ("", uniform_cache):
    ld = loader(qa, tok, DataConfig(**BASE, audio=True, cache_dir=cache_dir))
    start = time.perf_counter()
    batches = [next(ld) for _ in range(4)]
    runs.append((batches, dict(ld.counts), 8 / (time.perf_counter() - start)))
  (want, want_counts, decode_rate), (got, got_counts, cache_rate) = runs
  for a, b in zip(want, got):
    _same(a, b)
  assert got_counts == want_counts and set(got_counts) == {"missing file", "corrupt media", "short video",
                                                           "no audio"}
  print(f"\nsamples/s (incl. text and collation): decoding {decode_rate:.0f}, cache {cache_rate:.0f}")
  cfg = DataConfig(**BASE, audio=True, cache_dir=uniform_cache)
  builder = pickle.loads(pickle.dumps(SampleBuilder(tok, cfg)))
  assert builder._cache is None
  _same(builder(0, qa[0]), SampleBuilder(tok, DataConfig(**BASE, audio=True))(0, qa[0]))


def test_all_frames_pool_exact_with_headtail_and_crops(media):
  root, tok, _, captions = media
  out = build_cache([r["media"] for r in captions], str(root / "all"), num_frames=8, size=S, audio=False,
                    pool="all")
  assert MediaCache(out).get(captions[0]["media"]).frames.shape == (20, S, S, 3)
  runs = []
  for cache_dir in ("", str(root / "all")):  # the output root works as well as the dataset directory
    ld = loader(captions, tok, DataConfig(**(BASE | dict(augment=True)), seed=4, cache_dir=cache_dir))
    runs.append(([next(ld) for _ in range(3)], dict(ld.counts)))
  for a, b in zip(runs[0][0], runs[1][0]):
    _same(a, b)
  assert runs[0][1] == runs[1][1] and "short video" in runs[1][1]
  with pytest.raises(ConfigError, match="without audio; the data config needs 8 frames of 64 px with audio"):
    SampleBuilder(tok, DataConfig(**BASE, audio=True, cache_dir=out))
  with pytest.raises(ConfigError, match="needs 8 frames of 32 px"):
    SampleBuilder(tok, DataConfig(**(BASE | dict(size=32)), cache_dir=out))
  with pytest.raises(ConfigError, match="holds no media cache"):
    SampleBuilder(tok, DataConfig(**BASE, cache_dir=str(root)))


def test_float16_filterbanks_within_half_ulp(media, uniform_cache):
  root, _, qa, _ = media
  out = build_cache([r["media"] for r in qa[:2]], str(root / "f16"), num_frames=8, size=S, audio=True,
                    audio_dtype="float16")
  half, full = MediaCache(out), MediaCache(uniform_cache)
  worst = 0.0
  for r in qa[:2]:
    a, b = half.get(r["media"]).filterbanks, full.get(r["media"]).filterbanks
    assert a.dtype == np.float16 and a.shape == b.shape == (8, 1, 128, 204)
    err = np.abs(a.astype(np.float32) - b)
    assert (err <= 2.0 ** -11 * np.abs(b) + 2.0 ** -25).all()  # round to nearest: half an ulp
    worst = max(worst, float(err.max()))
  print(f"\nfloat16 filterbanks: max abs error {worst:.2e}, value range [{b.min():.2f}, {b.max():.2f}]")


def test_pool_indices_and_cli(media, tmp_path):
  assert pool_indices(20, 8.0, 8, "uniform") == sample_indices(20, 8)
  assert pool_indices(20, 8.0, 8, "all") == list(range(20))
  assert pool_indices(80, 8.0, 8, "2") == sample_indices(80, 20)  # 10 s at 2 fps
  assert pool_indices(20, 8.0, 8, "1") == sample_indices(20, 8)  # at least num_frames
  with pytest.raises(ValueError, match="short video"):
    pool_indices(5, 8.0, 8, "all")
  from vllama_jax.data.cache import main
  root, _, _, _ = media
  config = tmp_path / "config.py"
  config.write_text(
      "import ml_collections\n\n\ndef get_config():\n"
      "  return ml_collections.ConfigDict(dict(mode='video', template='vicuna', data=dict(\n"
      "      datasets=[dict(name='qa', format='videochat', ann='', media='', eval_ann='', eval_media='')],\n"
      "      batch_size=2, num_frames=8, size=32, cache_dir='')))\n")
  argv = ["--config", str(config), f"--config.data.datasets.0.ann={root / 'qa.json'}",
          f"--config.data.datasets.0.media={root / 'syn' / 'videos'}", "--out", str(tmp_path / "c"),
          "--pool", "2"]
  assert main(argv) == 0
  cache = MediaCache(str(tmp_path / "c"))
  assert cache.settings == dict(num_frames=8, size=32, pool="2", audio=False, audio_dtype="float32")
  assert len(cache) == 8 and cache.broken == {"missing file": 1, "corrupt media": 1, "short video": 1}
  assert main(argv[:-2] + ["--pool", "often"]) == 2
  with pytest.raises(SystemExit):  # a usage error before anything is written
    main(argv[:-4] + ["--out", str(tmp_path / "d"), "--threads", "0"])
  assert not (tmp_path / "d").exists()
  assert main(["--help"]) == 0  # before the config is read: it names --config instead of failing on it
  from vllama_jax.cli import parse_config_args
  from vllama_jax.data.build import data_config
  parsed, _ = parse_config_args(argv[:3] + [f"--config.data.cache_dir={tmp_path / 'c'}"], "")
  assert data_config(parsed, train=True).cache_dir == str(tmp_path / "c")
