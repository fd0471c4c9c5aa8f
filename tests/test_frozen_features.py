"""Frozen features: the stored rows are the frozen encoders' outputs, samples read from them carry the
same text and skip the same broken videos, the loss from them is the loss from frames, and features
that do not fit the data, the weights or the settings are refused."""

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from video_fixtures import BROKEN_VIDEOS as BROKEN, synthetic_with_broken_videos  # noqa: E402

from vllama_jax.cli import load_config_file  # noqa: E402
from vllama_jax.data import SampleBuilder, collate, videochat_records, webvid_records  # noqa: E402
from vllama_jax.data.build import data_config, make_loader  # noqa: E402
from vllama_jax.data.frozen_features import FrozenFeatures, build_features  # noqa: E402
from vllama_jax.errors import ConfigError  # noqa: E402
from vllama_jax.pretrained import PARAMS_DIR, load_video_llama, save_video_llama  # noqa: E402
from vllama_jax.random_checkpoint import write_tokenizer  # noqa: E402
from vllama_jax.text.tokenizer import Tokenizer  # noqa: E402
from vllama_jax.train import synthetic_job  # noqa: E402
from vllama_jax.train.step import make_eval_step  # noqa: E402
from vllama_jax.train.trainable import split_trainable  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """The quick synthetic config over 4 good and 4 broken videos, from a random start directory."""
  root = tmp_path_factory.mktemp("features")
  videos, names = synthetic_with_broken_videos(root / "syn")
  qa = [{"video": f"train/{n}.mp4", "QA": [{"q": "What moves?", "a": f"It is {n}."},
                                           {"q": "And the sound?", "a": "A tone."}]} for n in names]
  (root / "qa.json").write_text(json.dumps(qa))
  write_tokenizer(str(root / "tok"))
  config = load_config_file(CONFIG + ":quick")
  model = synthetic_job._random_model(config, Tokenizer(str(root / "tok")).vocab_size)
  save_video_llama(model, str(root / "init"), str(root / "tok"), template="llama_2")
  with config.unlocked():
    config.init_dir = str(root / "init")
    config.data.datasets[0].update(ann=str(root / "qa.json"), media=str(videos), eval_ann="")
  return config, root, videochat_records(str(root / "qa.json"), str(videos))


@pytest.fixture(scope="module")
def features(job):
  config, root, _ = job
  return build_features(config, str(root / "frozen"), batch_size=4)


def _with_features(config, directory):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.features_dir = directory
  return config


def test_stored_rows_are_the_frozen_encoders_outputs(job, features):
  config, _, records = job
  stored = FrozenFeatures(features)
  assert stored.broken == {"missing file": 1, "corrupt media": 1, "short video": 1, "no audio": 1}
  model = load_video_llama(config.init_dir, scan_layers=True)
  media = SampleBuilder(config.init_dir, data_config(config, train=False))
  for r in records[:4]:
    arrays, hint = stored.arrays(r["media"])
    expected, expected_hint = media.media(r, rng=None)
    assert hint == expected_hint and hint.startswith("The video contains 8 frames")
    frames, banks = expected["frames"][None], expected["filterbanks"][None]
    # fp32 both ways; a jitted batch of 4 against one eager sample sums in another order (~1e-6 here)
    np.testing.assert_allclose(arrays["frame_features"], model.video_branch.frame_features(frames)[0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(arrays["audio_embeddings"], model.audio_branch.audio_encoder(banks)[0],
                               rtol=1e-5, atol=1e-5)


def test_samples_from_features_have_the_same_text_and_skips(job, features):
  config, _, records = job
  cfg = data_config(config, train=True)
  plain, read = SampleBuilder(config.init_dir, cfg), SampleBuilder(config.init_dir, dataclasses.replace(cfg, features_dir=features))
  for i, r in enumerate(records):
    a, b = plain(i, r), read(i, r)
    assert a["broken"] == b["broken"] == BROKEN.get(os.path.basename(r["media"])[:-4], "")
    if a["broken"]:
      continue
    assert set(a) - set(b) == {"frames", "filterbanks"} and set(b) - set(a) == {"frame_features", "audio_embeddings"}
    for k in ("ids", "source", "labels"):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  batches = make_loader(_with_features(config, features), train=True)
  try:
    batch = next(batches)
    assert {"frame_features", "audio_embeddings"} <= set(batch) and "frames" not in batch
    assert batch["frame_features"].shape == (4, 8, 16, 64) and batch["audio_embeddings"].shape == (4, 8, 64)
  finally:
    batches.close()


def test_loss_from_features_is_the_loss_from_frames(job, features):
  config, _, records = job
  model = load_video_llama(config.init_dir, scan_layers=True)
  graphdef, params, frozen = split_trainable(model, config.trainable)
  params = jax.tree.map(lambda x: x + 0.01 * np.sign(x), params)  # away from the zero init of biases
  cfg = data_config(config, train=False)
  good = records[:4]
  for features_dir in ("", features):
    builder = SampleBuilder(config.init_dir, dataclasses.replace(cfg, features_dir=features_dir))
    batch = collate([builder(i, r) for i, r in enumerate(good)], 4, (192,))
    out = make_eval_step(graphdef, frozen, "audio_video")(params, batch)
    if not features_dir:
      from_frames = float(out["loss"])
  np.testing.assert_allclose(float(out["loss"]), from_frames, rtol=1e-5)
  assert np.isfinite(from_frames) and from_frames > 0


def test_features_that_do_not_fit_are_refused(job, features, tmp_path):
  config, root, records = job
  cfg = dataclasses.replace(data_config(config, train=True), features_dir=features)
  with pytest.raises(ConfigError, match="augment=False"):
    SampleBuilder(config.init_dir, dataclasses.replace(cfg, augment=True))
  with pytest.raises(ConfigError, match="hold 8 frames of 64 px with audio; the data config needs 4"):
    SampleBuilder(config.init_dir, dataclasses.replace(cfg, num_frames=4))
  with pytest.raises(ConfigError, match="holds no frozen features"):
    SampleBuilder(config.init_dir, dataclasses.replace(cfg, features_dir=str(tmp_path)))
  stored = FrozenFeatures(features)
  with pytest.raises(ConfigError, match="lack 1 of the data's videos"):
    stored.require(records + [dict(records[0], media=str(root / "elsewhere.mp4"))], train=True)
  (root / "anno").mkdir(exist_ok=True)
  (root / "anno" / "a.csv").write_text("videoid,page_dir,name\ntrain_00000,train,A clip.\n")
  captions = webvid_records(str(root / "anno"), str(root / "syn" / "videos"))
  with pytest.raises(ConfigError, match="captioned videos draw random frames"):
    stored.require(captions, train=True)
  stored.require(captions, train=False)  # held-out captions take uniform frames
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.data.num_frames = 4
  with pytest.raises(ConfigError, match="already holds frozen features of other settings"):
    build_features(other, features)
  assert build_features(config, features) == features  # the same: kept
  leaf = next(n for n in os.listdir(os.path.join(config.init_dir, PARAMS_DIR)) if "visual_encoder" in n)
  marker = os.path.join(config.init_dir, PARAMS_DIR, leaf, "commit_success.txt")
  os.utime(marker, ns=(os.stat(marker).st_atime_ns, os.stat(marker).st_mtime_ns + 10**9))  # new weights
  with pytest.raises(ConfigError, match="other settings, weights or videos"):
    build_features(config, features)
  with pytest.raises(ConfigError, match="computed from other frozen encoder weights"):
    make_loader(_with_features(config, features), train=True)


def test_cli_writes_what_the_builder_writes(job, features, tmp_path, capsys):
  from vllama_jax.data.frozen_features import main
  config, root, _ = job
  argv = ["--config", CONFIG + ":quick", f"--config.init_dir={config.init_dir}",
          f"--config.data.datasets.0.ann={root / 'qa.json'}",
          f"--config.data.datasets.0.media={root / 'syn' / 'videos'}", "--batch_size", "4", "--out", str(tmp_path / "f")]
  assert main(argv) == 0
  assert "8 videos" in capsys.readouterr().out
  for name in ("frame_features.npy", "audio_embeddings.npy"):
    np.testing.assert_array_equal(np.load(tmp_path / "f" / name), np.load(os.path.join(features, name)))
  assert main(argv[:2] + [f"--config.init_dir={tmp_path / 'nowhere'}"] + argv[3:-1] + [str(tmp_path / "g")]) == 2
  assert "no such directory" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # a usage error before anything is written
    main(argv[:-3] + ["0", "--out", str(tmp_path / "h")])
  assert "argument --batch_size: expected an integer >= 1, got '0'" in capsys.readouterr().err
  assert not (tmp_path / "h").exists()
