"""The synthetic audio-visual dataset: its mp4s decode with our loaders, the labelled attributes
can be read back from the media by simple independent analysis, the annotation files agree, and
generation is deterministic, balanced and idempotent."""

import collections
import csv
import json
import os

import numpy as np
import pytest

from vllama_jax.data import synthetic as S
from vllama_jax.errors import ConfigError
from vllama_jax.data.formats import videochat_records, webvid_records
from vllama_jax.media.audio import audio_features, load_audio
from vllama_jax.media.image import CLIP_MEAN, CLIP_STD
from vllama_jax.media.video import load_video

NUM_TRAIN, NUM_TEST, SEED = 16, 8, 3
RGB = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (x, y), y down


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return S.generate(tmp_path_factory.mktemp("synthetic") / "ds", NUM_TRAIN, NUM_TEST, SEED)


def samples(d):
  for split in S.SPLITS:
    for vid, attrs in S.load_attributes(d, split).items():
      yield d / "videos" / split / f"{vid}.mp4", attrs


def rgb_frames(path):
  v = load_video(path, 8, 64)
  return v, (v.frames * np.array(CLIP_STD) + np.array(CLIP_MEAN)) * 255


def shape_mask(frame):
  """Pixels far from the frame's median (background) colour."""
  dist = np.abs(frame - np.median(frame.reshape(-1, 3), axis=0)).sum(-1)
  return dist > 0.5 * dist.max()


def colour_of(frames):
  """Nearest pure hue to the mean colour of the shape pixels, normalised by its brightest
  channel."""
  pixels = np.concatenate([f[shape_mask(f)] for f in frames])
  c = pixels.mean(0) / pixels.mean(0).max()
  return min(RGB, key=lambda k: np.abs(c - RGB[k]).sum())


def centroid(frame):
  ys, xs = np.nonzero(shape_mask(frame))
  return np.array([xs.mean(), ys.mean()])


def test_media_decode_with_our_loaders(data):
  for path, _ in samples(data):
    v, _ = rgb_frames(path)
    assert v.frames.shape == (8, 64, 64, 3) and np.isfinite(v.frames).all()
    assert v.num_frames == S.NUM_FRAMES and v.fps == S.FPS
    assert abs(v.duration - S.SECONDS) < 0.05
    w = load_audio(path)
    assert w.sample_rate == 16000 and w.samples.shape[0] == 1
    assert S.SECONDS - 0.01 <= w.duration <= S.SECONDS + 0.1  # AAC pads its last frame
    feats = audio_features(path)
    assert feats.shape == (8, 1, 128, 204) and np.isfinite(feats).all()


def test_colour_and_direction_from_frames(data):
  for path, attrs in samples(data):
    _, frames = rgb_frames(path)
    assert colour_of(frames) == attrs["colour"], path
    move = centroid(frames[-1]) - centroid(frames[0])
    assert np.linalg.norm(move) > 8, path
    assert max(UNIT, key=lambda k: move @ UNIT[k]) == attrs["direction"], path


def test_track_is_the_centre_of_the_drawn_shape(data):
  split, index = "train", 0
  attrs = S.load_attributes(data, split)[f"{split}_{index:05d}"]
  frames, track = S.render_track(attrs, S._rng(SEED, split, index, 0))
  np.testing.assert_array_equal(frames, S.render_frames(attrs, S._rng(SEED, split, index, 0)))
  for frame, centre in zip(frames, track):
    assert np.abs(centroid(frame.astype(np.float32)) - centre).max() < 1.0
  _, decoded = rgb_frames(data / "videos" / split / f"{split}_{index:05d}.mp4")
  for frame, t in zip(decoded, [k * S.NUM_FRAMES // 8 for k in range(8)]):  # the uniform indices
    assert np.abs(centroid(frame) - track[t]).max() < 1.5


def test_shape_from_frames(data):
  """In the box of the strongly coloured pixels: squares and triangles fill the corners (circles
  and crosses do not), and squares and circles fill more of the box than triangles and crosses.
  Majority over the sampled frames (chroma subsampling blurs a 64x64 frame's edges)."""
  for path, attrs in samples(data):
    _, frames = rgb_frames(path)
    votes = collections.Counter()
    for frame in frames:
      dist = np.abs(frame - np.median(frame.reshape(-1, 3), axis=0)).sum(-1)
      w = dist / dist.max()
      ys, xs = np.nonzero(w > 0.5)
      box = w[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
      corners = np.mean([box[:2, :2], box[:2, -2:], box[-2:, :2], box[-2:, -2:]])
      if corners > 0.2:
        votes["square" if box.mean() > 0.7 else "triangle"] += 1
      else:
        votes["circle" if box.mean() > 0.64 else "cross"] += 1
    assert votes.most_common(1)[0][0] == attrs["shape"], (path, votes)


def test_pitch_and_silence_from_audio(data):
  mel_peaks = collections.defaultdict(set)
  for path, attrs in samples(data):
    x = load_audio(path).samples[0]
    rms = np.sqrt(np.mean(x ** 2))
    if attrs["sound"] == "silence":
      assert rms < 0.01, path
      continue
    assert rms > 0.1, path
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak = np.fft.rfftfreq(len(x), 1 / 16000)[spectrum.argmax()]
    assert min(S.PITCHES, key=lambda k: abs(np.log(peak / (S.PITCHES[k] or 1)))) == attrs["sound"]
    assert abs(peak / S.PITCHES[attrs["sound"]] - 1) < 0.04, (path, peak)
    mel_peaks[attrs["sound"]].add(int(audio_features(path)[0, 0].mean(-1).argmax()))
  low, mid, high = (mel_peaks[k] for k in ("low", "middle", "high"))
  assert max(low) + 5 < min(mid) and max(mid) + 5 < min(high)  # well apart in ImageBind's mels


def test_annotations_agree(data):
  manifest = json.loads((data / "manifest.json").read_text())
  assert manifest["splits"] == {"train": NUM_TRAIN, "test": NUM_TEST}
  for split, n in manifest["splits"].items():
    attributes = S.load_attributes(data, split)
    assert len(attributes) == n
    ann = data / "annotations" / split
    with open(ann / "captions.csv", newline="") as f:
      rows = list(csv.DictReader(f))
    assert [r["videoid"] for r in rows] == list(attributes)
    for r in rows:
      assert (data / "videos" / r["page_dir"] / f"{r['videoid']}.mp4").is_file()
      a = attributes[r["videoid"]]
      assert f"{a['colour']} {a['shape']}" in r["name"] and a["direction"] in r["name"]
      assert (a["sound"] if a["sound"] == "silence" else f"{a['sound']} tone") in r["name"]
    qa = json.loads((ann / "qa.json").read_text())
    assert len(qa) == n
    for item, (vid, a) in zip(qa, attributes.items()):
      assert item["video"] == f"{split}/{vid}.mp4" and (data / "videos" / item["video"]).is_file()
      assert len(item["QA"]) == 4
      for attr in S.ATTRIBUTES:  # exactly one answer names a value of each attribute
        named = [S.parse_answer(p["a"], attr) for p in item["QA"]]
        assert [v for v in named if v] == [a[attr]]
    records = webvid_records(str(ann), str(data / "videos"))  # the real-data readers
    records += videochat_records(str(ann / "qa.json"), str(data / "videos"))
    assert len(records) == 2 * n and not any(r["broken"] for r in records)
    assert all(os.path.isfile(r["media"]) for r in records)
    corpus = S.text_corpus(data)
    assert len(corpus) == sum(manifest["splits"].values()) * 9
    assert rows[0]["name"] in corpus and qa[0]["QA"][0]["q"] in corpus


def test_balanced_and_deterministic(data):
  for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    attributes = S.load_attributes(data, split).values()
    for attr, vocab in S.VOCAB.items():
      counts = collections.Counter(a[attr] for a in attributes)
      assert sorted(counts) == sorted(vocab) and set(counts.values()) == {n // 4}
  assert list(S.load_attributes(data, "test").values()) == S.assign_attributes(8, SEED, "test")
  assert S.assign_attributes(8, SEED + 1, "test") != S.assign_attributes(8, SEED, "test")


def mtimes(d):
  return {p: p.stat().st_mtime_ns for p in d.rglob("*")}


def test_idempotent_and_partial_regenerated(tmp_path, capsys):
  d = tmp_path / "ds"
  assert S.generate(d, 4, 4, seed=1) == d
  before = mtimes(d)
  video = d / "videos" / "train" / "train_00002.mp4"
  content = video.read_bytes()
  S.generate(d, 4, 4, seed=1)
  assert mtimes(d) == before  # nothing rewritten
  video.unlink()  # partial: a video is missing
  S.generate(d, 4, 4, seed=1)
  assert video.read_bytes() == content  # deterministic
  (d / "manifest.json").unlink()  # partial: interrupted before the manifest
  S.generate(d, 4, 4, seed=1)
  assert S.is_complete(d, json.loads((d / "manifest.json").read_text()))
  S.generate(d, 4, 0, seed=2)  # other parameters replace the dataset
  assert len(S.load_attributes(d, "train")) == 4 and not S.load_attributes(d, "test")
  assert not list((d / "videos" / "test").iterdir())
  assert sorted(os.listdir(tmp_path)) == ["ds"]  # no temporary directories left
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(ConfigError, match="'.*other' holds files that are not a synthetic dataset"):
    S.generate(other, 1, 1)
  import train  # the main job says so in one line, and writes nothing
  workdir = tmp_path / "run"
  assert train.main(["--config", "configs/synthetic.py", "--workdir", str(workdir),
                     f"--config.synthetic.data_dir={other}"]) == 2
  assert capsys.readouterr().err.startswith(f"error: synthetic data directory '{other}' holds files")
  assert (other / "notes.txt").read_text() == "keep me" and os.listdir(other) == ["notes.txt"]
  assert not workdir.exists()


def test_score_answers():
  attributes = {"a": {"colour": "red", "shape": "circle", "direction": "left", "sound": "low"},
                "b": {"colour": "blue", "shape": "cross", "direction": "up", "sound": "silence"}}
  answers = {"a": {"colour": "The shape is red.", "direction": "It moves to the right, then left",
                   "sound": "A LOW tone."},
             "b": {"colour": "Blue, or maybe red.", "direction": "upwards",
                   "sound": "It is silent."}}
  # "right, then left" and "blue, or maybe red" name two values: wrong, whichever comes first
  assert S.score_answers(answers, attributes) == {"colour": 0.5, "direction": 0.5, "sound": 1.0}
  answers["a"]["direction"] = "It moves left, leftwards."  # one value, twice
  assert S.score_answers(answers, attributes) == {"colour": 0.5, "direction": 1.0, "sound": 1.0}
  answers = {"a": {"shape": "a circle"}, "b": {"colour": "I do not know."}}
  assert S.score_answers(answers, attributes) == {"colour": 0.0, "shape": 0.5}
  assert S.parse_answer("Middle.", "sound") == "middle"
  assert S.parse_answer("greenish", "colour") is None
