"""grain pipelines on tiny generated media: shapes, bad data, mixing, state, sharding."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from video_fixtures import write_video  # noqa: E402

from vllama_jax.data import (DataConfig, SampleBuilder, augment, image_caption_records, llava_records,  # noqa: E402
                             loader, mix, videochat_records, webvid_records)
from vllama_jax.errors import ConfigError, NoUsableSample  # noqa: E402
from vllama_jax.random_checkpoint import write_tokenizer  # noqa: E402
from vllama_jax.text.tokenizer import Tokenizer  # noqa: E402

N, S = 4, 32
BASE = dict(batch_size=2, size=S, num_query_tokens=N, shard_index=0, shard_count=1, num_threads=1,
            prefetch=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  tok = str(root / "tok")
  write_tokenizer(tok)
  vids = root / "videos" / "p0"
  vids.mkdir(parents=True)
  for i in range(4):
    write_video(vids / f"{i}.mp4", num_frames=20, width=48, height=40)
  write_video(vids / "short.mp4", num_frames=5, width=48, height=40)
  (vids / "bad.mp4").write_bytes(b"\x00not a video" * 50)
  anno = root / "anno"
  anno.mkdir()
  rows = ["videoid,page_dir,name"] + [f"{i},p0,A Dog. runs {i}!" for i in range(4)] + [
      "missing,p0,gone", "bad,p0,corrupt", "0,p0,!!!", "short,p0,short one"]
  (anno / "a.csv").write_text("\n".join(rows) + "\n")
  imgs = root / "images"
  imgs.mkdir()
  rng = np.random.default_rng(0)
  for i in range(10):
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(imgs / f"{i}.jpg")
  (imgs / "COCO_train2014_1.jpg").write_bytes((imgs / "1.jpg").read_bytes())
  (root / "cap.json").write_text(json.dumps({"annotations": [
      {"image_id": str(i), "caption": f"picture number {i}"} for i in range(10)] + [{"image_id": "x"}]}))
  long_q = "word " * 300
  (root / "llava.json").write_text(json.dumps([
      {"image": "1.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                           {"from": "gpt", "value": "A thing."}]},
      {"image": "1.jpg", "conversations": [{"from": "human", "value": long_q + "<image>"},
                                           {"from": "gpt", "value": "Long."}]},
      {"image": "1.jpg"}]))
  (root / "vc.json").write_text(json.dumps([
      {"video": "p0/1.mp4", "QA": [{"q": "What?", "a": "A dog."}, {"q": "Then?", "a": "Runs."}]}]))
  return root, tok


def _take(ld, n):
  return [next(ld) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_webvid_bad_data_and_shapes(data):
  root, tok = data
  recs = webvid_records(str(root / "anno"), str(root / "videos"))
  assert recs[0]["caption"] == "A Dog. runs 0!"
  ld = loader(recs, tok, DataConfig(**BASE))
  batches = _take(ld, 4)
  for b in batches:
    assert b["frames"].shape == (2, 8, S, S, 3) and b["frames"].dtype == np.float32
    assert b["ids"].shape[1] == 64 and b["ids"].dtype == np.int32
    assert (b["weight"] == 1).all()
    for row in range(2):
      assert (b["source"][row] >= 0).sum() == N and (b["ids"][row][b["source"][row] >= 0] == 0).all()
      assert b["source"][row, 1:1 + N].tolist() == list(range(N))
  assert ld.counts["missing file"] >= 1 and ld.counts["corrupt media"] >= 1
  assert ld.counts["empty caption"] >= 1 and ld.counts["short video"] >= 1
  # caption cleaned: "a dog runs k" + "\n" are the targets
  words = Tokenizer(tok).decode([i for i in batches[0]["labels"][0] if i != -100])
  assert words.startswith("a dog runs ") and words.endswith("\n")
  ld.close()


def test_state_round_trip(data):
  root, tok = data
  recs = webvid_records(str(root / "anno"), str(root / "videos"))
  ld = loader(recs, tok, DataConfig(**BASE, seed=3))
  _take(ld, 2)
  state = ld.get_state()
  after = _take(ld, 3)
  ld2 = loader(recs, tok, DataConfig(**BASE, seed=3))
  ld2.set_state(state)
  for a, b in zip(after, _take(ld2, 3)):
    _same(a, b)
  assert ld2.counts == ld.counts


def test_images_eval_fill_and_instructions(data):
  root, tok = data
  recs = image_caption_records(str(root / "cap.json"), str(root / "images"))
  assert recs[-1]["broken"] == "bad annotation" and recs[0]["caption"] == "picture number 0"
  cfg = DataConfig(**(BASE | dict(batch_size=4)), train=False)
  batches = list(loader(recs, tok, cfg))
  assert [b["weight"].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
  assert batches[-1]["frames"].shape == (4, 1, S, S, 3)
  assert (batches[-1]["attention_mask"][2:] == 0).all() and (batches[-1]["labels"][2:] == -100).all()
  recs = llava_records(str(root / "llava.json"), str(root / "images") + "/")
  ld = loader(recs, tok, DataConfig(**BASE, template="llama_v2"))
  b = next(ld)
  assert b["frames"].shape == (2, 1, S, S, 3) and b["ids"].shape[1] in range(64, 513, 64)
  assert ld.counts["too long"] >= 1 and ld.counts["bad annotation"] >= 1


def test_a_broken_text_is_skipped_before_its_media_are_opened(data):
  root, tok = data
  recs = llava_records(str(root / "llava.json"), str(root / "nowhere") + "/")[:2]  # every image missing
  builder = SampleBuilder(tok, DataConfig(**BASE, template="llama_v2"))
  assert [builder(i, r)["broken"] for i, r in enumerate(recs)] == ["missing file", "too long"]


def test_all_broken_shard_raises_instead_of_waiting(data):
  root, tok = data
  recs = image_caption_records(str(root / "cap.json"), str(root / "images"))[:4]
  gone = [r | {"media": str(root / "nowhere" / f"{i}.jpg")} for i, r in enumerate(recs)]
  with pytest.raises(NoUsableSample, match=r"dataset 'cc': no usable sample in 8 records in a row.*'missing file': 8"):
    next(loader(gone, tok, DataConfig(**BASE, seed=1), name="cc"))
  # one good record among four: runs of broken ones span epochs but stay under two passes
  ld = loader(gone[:3] + recs[3:], tok, DataConfig(**BASE, seed=1))
  for b in _take(ld, 4):
    assert (b["weight"] == 1).all()
  assert ld.counts["missing file"] >= 8


def test_videochat_hint(data):
  root, tok = data
  recs = videochat_records(str(root / "vc.json"), str(root / "videos"))
  b = next(loader(recs, tok, DataConfig(**BASE)))
  text = Tokenizer(tok).decode(b["ids"][0][b["source"][0] < 0])
  assert "The video contains 8 frames sampled at 0.0, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5, 1.7 seconds." in text
  assert (b["source"][0] >= 0).sum() == N


def test_sharding_disjoint_and_cover(data):
  root, tok = data
  recs = image_caption_records(str(root / "cap.json"), str(root / "images"))[:10]
  seen = []
  for shard in range(2):
    cfg = DataConfig(**(BASE | dict(shard_index=shard, shard_count=2, batch_size=5)), train=False)
    (b,) = list(loader(recs, tok, cfg))
    seen.append({Tokenizer(tok).decode([i for i in row if i != -100]).strip() for row in b["labels"]})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {f"picture number {i}" for i in range(10)}


def test_mix_ratios_and_state(data):
  root, tok = data
  m = mix([iter([]), iter([])], ratios=[100, 24], seed=1)
  picks = np.array([m.choose(k) for k in range(4000)])
  assert abs((picks == 0).mean() - 100 / 124) < 0.03
  assert [m.choose(k) for k in range(50)] == [mix([1, 2], [100, 24], seed=1).choose(k) for k in range(50)]
  assert abs((np.array([mix([1, 2, 3]).choose(k) for k in range(3000)]) == 2).mean() - 1 / 3) < 0.03

  def build():
    a = loader(image_caption_records(str(root / "cap.json"), str(root / "images")), tok,
               DataConfig(**BASE), name="cap")
    v = loader(webvid_records(str(root / "anno"), str(root / "videos")), tok, DataConfig(**BASE),
               name="webvid")
    return mix([a, v], ratios=[1, 1], seed=5)
  m = build()
  _take(m, 3)
  state = m.get_state()
  after = [(next(m), m.last) for _ in range(3)]
  m2 = build()
  m2.set_state(state)
  for a, ka in after:
    _same(a, next(m2))
    assert ka == m2.last
  assert set(m.counts) == {"cap", "webvid"}
  reordered = mix(m2.loaders[::-1])
  with pytest.raises(ConfigError, match=r"for the datasets \['cap', 'webvid'\], the config has \['webvid', 'cap'\]"):
    reordered.set_state(state)


def test_worker_processes_match(data):
  root, tok = data
  recs = webvid_records(str(root / "anno"), str(root / "videos"))
  ld = loader(recs, tok, DataConfig(**BASE, num_workers=1))
  try:
    got = _take(ld, 2)
  finally:
    ld.close()
  for a, b in zip(got, _take(loader(recs, tok, DataConfig(**BASE)), 2)):
    _same(a, b)
  assert sum(ld.counts.values()) >= 1
  ld = loader(recs, tok, DataConfig(**BASE, num_workers=1))
  ld2 = loader(recs, tok, DataConfig(**BASE, num_workers=1))
  try:  # state round trip through the worker process
    next(ld)
    ld2.set_state(ld.get_state())
    _same(next(ld), next(ld2))
  finally:
    ld.close()
    ld2.close()


def test_joint_audio_video(data, tmp_path):
  root, tok = data
  write_video(tmp_path / "av.mp4", num_frames=20, width=48, height=40, audio_first=True)
  (tmp_path / "vc.json").write_text(json.dumps([{"video": "av.mp4", "QA": [{"q": "Hi?", "a": "Yo."}]},
                                                {"video": str(root / "videos/p0/1.mp4"),
                                                 "QA": [{"q": "Hi?", "a": "Yo."}]}]))
  ld = loader(videochat_records(str(tmp_path / "vc.json"), str(tmp_path)), tok,
              DataConfig(**(BASE | dict(batch_size=1)), audio=True))
  b = next(ld)
  assert b["filterbanks"].shape == (1, 8, 1, 128, 204)
  src = b["source"][0]
  assert (src >= 0).sum() == 8 + N and src[src >= 0].tolist() == list(range(8 + N))
  next(ld)
  assert ld.counts["no audio"] >= 1


def test_audio_mode_reads_no_frames(data, tmp_path):
  root, tok = data
  write_video(tmp_path / "av.mp4", num_frames=20, width=48, height=40, audio_first=True)
  write_video(tmp_path / "short.mp4", num_frames=5, width=48, height=40, audio_first=True)  # 8 frames needed
  qa = [{"q": "Hi?", "a": "Yo."}]
  (tmp_path / "vc.json").write_text(json.dumps([{"video": "av.mp4", "QA": qa}, {"video": "short.mp4", "QA": qa},
                                                {"video": "gone.mp4", "QA": qa}]))
  records = videochat_records(str(tmp_path / "vc.json"), str(tmp_path))
  base = BASE | dict(batch_size=1, train=False, audio=True)
  joint, audio_only = (loader(records, tok, DataConfig(**base, video=v)) for v in (True, False))
  first, b = next(joint), next(audio_only)
  assert "frames" in first and "frames" not in b
  np.testing.assert_array_equal(b["filterbanks"], first["filterbanks"])
  src = b["source"][0]
  assert src[src >= 0].tolist() == list(range(8))
  assert "<Audio>" in Tokenizer(tok).decode(b["ids"][0][src < 0].tolist())
  assert "frames" not in next(audio_only)  # the short video: its audio is all this mode reads
  with pytest.raises(StopIteration):
    next(audio_only)
  assert dict(audio_only.counts) == {"missing file": 1}
  with pytest.raises(StopIteration):
    next(joint)
  assert dict(joint.counts) == {"short video": 1, "missing file": 1}


def test_augment_units():
  rng = np.random.default_rng(0)
  for _ in range(20):
    idx = augment.headtail_indices(rng, 20, 8)
    assert idx == sorted(idx) and all(i < 10 for i in idx[:4]) and all(i >= 10 for i in idx[4:])
  with pytest.raises(ValueError):
    augment.headtail_indices(rng, 7, 8)
  i, j, h, w = augment.crop_params(rng, 40, 48)
  assert 0 <= i <= 40 - h and 0 <= j <= 48 - w and 0.5 * 40 * 48 * 0.9 <= h * w <= 40 * 48
  assert augment.to_uint8(np.array([-1.3, -0.7, 255.9, 256.2, 300.7])).tolist() == [255, 0, 255, 0, 44]
  assert augment.to_uint8(np.array([-1.3, 256.2]), "clip").tolist() == [0, 255]
  frames = rng.integers(0, 255, (3, 40, 48, 3), np.uint8)
  a = augment.crop_video(frames, np.random.default_rng(7), S)
  assert a.shape == (3, S, S, 3)
  np.testing.assert_array_equal(a, augment.crop_video(frames, np.random.default_rng(7), S))
