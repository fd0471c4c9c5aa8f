"""Synthetic audio-visual dataset: the embedded default training job.

Each sample is a real mp4 (H.264 video, AAC audio, written with PyAV): one shape moving in a
straight line over a soft background, with a pure tone or near-silence. Captions and question /
answer pairs describe its four attributes, each with four values (chance 25%):

  colour     red, green, blue, yellow      (saturated, +-12 jitter per channel)
  shape      circle, square, triangle, cross
  direction  left, right, up, down         (left vs right differs only in frame order)
  sound      low, middle, high, silence    (300, 800, 2000 Hz +-3%; silence is noise at 1e-3)

Media: 64x64 at 8 fps, 2.5 s (20 frames); AAC mono 16 kHz, 2.5 s (2.56 s decoded: AAC pads its
last frame), so ImageBind's 8 clips of 2 s are all full. The tones peak in mel bins ~15, ~36 and
~67 of the 128-bin filterbank. The background is a low-saturation colour (grey 70-180, tint
+-15) with a gentle gradient and smooth noise, static over time; the shape (half-size 7-10 px,
anti-aliased) moves at constant speed from the first 30% to the last 30% of its range in its
direction, at a random constant position across.

Layout of `directory` (ids are `{split}_{index:05d}`, splits `train` and `test`):
  videos/{split}/{id}.mp4
  annotations/{split}/captions.csv    WebVid style: videoid, page_dir (= split), name (caption)
  annotations/{split}/qa.json         VideoChat-11k style: [{"video": "{split}/{id}.mp4",
                                      "QA": [{"q": ..., "a": ...}, ...]}], paths under videos/
  annotations/{split}/attributes.json {id: {"colour", "shape", "direction", "sound"}}
  manifest.json                       parameters; written last, marks a complete dataset

Attribute values are balanced per split (each value n/4 times, give or take one, shuffled
independently per attribute); everything is deterministic given the seed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vllama_jax.errors import ConfigError

FORMAT = "vllama_jax.synthetic/1"
SPLITS = ("train", "test")
SIZE, FPS, NUM_FRAMES = 64, 8, 20
SECONDS = NUM_FRAMES / FPS
SAMPLE_RATE = 16000

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down
PITCHES = {"low": 300.0, "middle": 800.0, "high": 2000.0, "silence": None}
VOCAB = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": tuple(DIRECTIONS),
         "sound": tuple(PITCHES)}
ATTRIBUTES = tuple(VOCAB)
ALIASES = {  # other answer words accepted by score_answers
    "direction": {"leftward": "left", "leftwards": "left", "rightward": "right",
                  "rightwards": "right", "upward": "up", "upwards": "up", "downward": "down",
                  "downwards": "down"},
    "sound": {"silent": "silence", "mid": "middle", "medium": "middle"},
}

_DIR_PHRASE = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
_CAPTIONS = ("A {c} {s} moves {d} {snd}.", "A {c} {s} slides {d} across the frame {snd}.",
             "The video shows a {c} {s} moving {d} {snd}.")
_QUESTIONS = {
    "colour": ("What colour is the shape?", "What is the colour of the moving shape?",
               "Which colour does the object have?", "What color is the shape in the video?"),
    "shape": ("What shape is shown?", "What kind of shape moves in the video?",
              "Which shape do you see?", "What is the moving object?"),
    "direction": ("Which way does the shape move?", "In which direction is the shape moving?",
                  "Where does the object go?", "What direction does the shape travel in?"),
    "sound": ("What sound do you hear?", "What does the audio sound like?",
              "Describe the sound of the video.", "What can you hear?"),
}


def _answer(attribute: str, value: str) -> str:
  if attribute == "colour":
    return f"The shape is {value}."
  if attribute == "shape":
    return f"It is a {value}."
  if attribute == "direction":
    return f"It moves {value}."
  return "There is silence." if value == "silence" else f"A {value} tone."


def _sound_phrase(sound: str) -> str:
  return "in silence" if sound == "silence" else f"while a {sound} tone plays"


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split), index, stream])


def assign_attributes(n: int, seed: int, split: str) -> list[dict]:
  """Balanced attributes of a split's n samples: each value n/k times, independently shuffled."""
  rng = np.random.default_rng([seed, SPLITS.index(split), 2 ** 31])
  columns = {a: rng.permutation(np.arange(n) % len(v)) for a, v in VOCAB.items()}
  return [{a: VOCAB[a][int(columns[a][i])] for a in ATTRIBUTES} for i in range(n)]


def texts(attrs: dict, rng: np.random.Generator) -> tuple[str, list[dict]]:
  """A caption and the four QA pairs (shuffled order, random phrasings) of one sample."""
  c, s, d, snd = (attrs[a] for a in ATTRIBUTES)
  template = _CAPTIONS[rng.integers(len(_CAPTIONS))]
  caption = template.format(c=c, s=s, d=_DIR_PHRASE[d], snd=_sound_phrase(snd))
  qa = [{"q": _QUESTIONS[a][rng.integers(len(_QUESTIONS[a]))], "a": _answer(a, attrs[a])}
        for a in ATTRIBUTES]
  return caption, [qa[i] for i in rng.permutation(len(qa))]


# --- rendering ---------------------------------------------------------------------------------

def _background(rng) -> np.ndarray:
  """float32 (SIZE, SIZE, 3): low-saturation colour, gentle gradient, smooth noise."""
  base = rng.uniform(70, 180) + rng.uniform(-15, 15, 3)
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
  angle = rng.uniform(0, 2 * np.pi)
  gradient = rng.uniform(0, 12) * (np.cos(angle) * xx + np.sin(angle) * yy)
  coarse = rng.normal(0, 4, (5, 5))
  pos = np.linspace(0, 4, SIZE)  # bilinear upsampling of the 5x5 grid
  i0 = np.minimum(pos.astype(int), 3)
  f = pos - i0
  rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
  noise = rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f
  return (base + (gradient + noise)[..., None]).astype(np.float32)


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  if shape == "triangle":  # pointing up, base at dy = r
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
  arm = r / 3  # cross
  return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))


def render_frames(attrs: dict, rng: np.random.Generator) -> np.ndarray:
  """uint8 (NUM_FRAMES, SIZE, SIZE, 3) frames of one sample."""
  return render_track(attrs, rng)[0]


def render_track(attrs: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The frames of one sample and the shape's centre (x, y) in pixels in each, (NUM_FRAMES, 2)."""
  bg = _background(rng)
  colour = np.clip(np.array(COLOURS[attrs["colour"]]) + rng.uniform(-12, 12, 3), 0, 255)
  r = rng.uniform(7, 10)
  lo, span = r, SIZE - 2 * r  # centre range [r, SIZE - r]
  ddx, ddy = DIRECTIONS[attrs["direction"]]
  start = lo + span * rng.uniform(0, 0.3)
  end = lo + span * rng.uniform(0.7, 1.0)
  across = lo + span * rng.uniform(0, 1)
  if ddx + ddy < 0:
    start, end = SIZE - start, SIZE - end
  along = np.linspace(start, end, NUM_FRAMES)
  cx, cy = (along, np.full(NUM_FRAMES, across)) if ddx else (np.full(NUM_FRAMES, across), along)
  frames = np.empty((NUM_FRAMES, SIZE, SIZE, 3), np.uint8)
  frames[:] = np.clip(np.rint(bg), 0, 255)
  for t in range(NUM_FRAMES):  # draw in the shape's box, 2x2 supersampled for smooth edges
    x0, y0 = (max(int(c - r) - 1, 0) for c in (cx[t], cy[t]))
    x1, y1 = (min(int(c + r) + 2, SIZE) for c in (cx[t], cy[t]))
    sx = (np.arange(2 * x0, 2 * x1) + 0.5) / 2 - cx[t]
    sy = (np.arange(2 * y0, 2 * y1) + 0.5) / 2 - cy[t]
    m = _mask(attrs["shape"], sx[None, :], sy[:, None], r)
    alpha = m.reshape(y1 - y0, 2, x1 - x0, 2).mean(axis=(1, 3), dtype=np.float32)[..., None]
    box = bg[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
    frames[t, y0:y1, x0:x1] = np.clip(np.rint(box), 0, 255)
  return frames, np.stack([cx, cy], axis=1)


def render_audio(attrs: dict, rng: np.random.Generator) -> np.ndarray:
  """float32 mono samples: a tone with jittered pitch/amplitude/phase and 20 ms fades, or noise."""
  n = int(round(SECONDS * SAMPLE_RATE))
  noise = rng.normal(0, 1e-3, n)
  pitch = PITCHES[attrs["sound"]]
  if pitch is None:
    return noise.astype(np.float32)
  t = np.arange(n) / SAMPLE_RATE
  freq = pitch * rng.uniform(0.97, 1.03)
  x = rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
  fade = np.minimum(1, np.minimum(t, t[-1] - t) / 0.02)
  return (x * fade + noise).astype(np.float32)


def write_mp4(path, frames: np.ndarray, audio: np.ndarray):
  """H.264 (ultrafast, crf 18, yuv420p) + AAC (fast coder, 48 kb/s mono) mp4 with PyAV."""
  import av
  with av.open(str(path), "w") as out:
    vs = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "crf": "18"})
    vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    vs.codec_context.thread_count = 1
    aus = out.add_stream("aac", rate=SAMPLE_RATE, options={"aac_coder": "fast"})
    aus.layout, aus.bit_rate = "mono", 48000
    for i, img in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(img, format="rgb24")
      frame.pts = i
      out.mux(vs.encode(frame))
    out.mux(vs.encode())
    step = aus.codec_context.frame_size or 1024
    for i in range(0, len(audio), step):
      frame = av.AudioFrame.from_ndarray(audio[None, i:i + step], format="fltp", layout="mono")
      frame.sample_rate, frame.pts = SAMPLE_RATE, i
      out.mux(aus.encode(frame))
    out.mux(aus.encode())


def _write_sample(job):
  root, seed, split, index, attrs = job
  rng = _rng(seed, split, index, 0)
  frames = render_frames(attrs, rng)
  write_mp4(Path(root) / "videos" / split / f"{split}_{index:05d}.mp4", frames,
            render_audio(attrs, rng))


# --- dataset -----------------------------------------------------------------------------------

def _manifest(num_train: int, num_test: int, seed: int) -> dict:
  return {"format": FORMAT, "seed": int(seed), "splits": {"train": int(num_train),
          "test": int(num_test)}, "size": SIZE, "fps": FPS, "num_frames": NUM_FRAMES,
          "sample_rate": SAMPLE_RATE, "vocab": {a: list(v) for a, v in VOCAB.items()},
          "pitches": {k: v for k, v in PITCHES.items() if v}}


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_complete(directory, manifest: dict) -> bool:
  """Whether `directory` holds a whole dataset generated with `manifest`'s parameters."""
  d = Path(directory)
  if _read_json(d / "manifest.json") != manifest:
    return False
  for split, n in manifest["splits"].items():
    ann = d / "annotations" / split
    if not all((ann / f).is_file() for f in ("captions.csv", "qa.json", "attributes.json")):
      return False
    for i in range(n):
      p = d / "videos" / split / f"{split}_{i:05d}.mp4"
      if not p.is_file() or p.stat().st_size == 0:
        return False
  return True


def _write_annotations(root: Path, split: str, seed: int, attributes: list[dict]):
  ann = root / "annotations" / split
  ann.mkdir(parents=True, exist_ok=True)
  rows, qa = [], []
  for i, attrs in enumerate(attributes):
    vid = f"{split}_{i:05d}"
    caption, pairs = texts(attrs, _rng(seed, split, i, 1))
    rows.append((vid, split, caption))
    qa.append({"video": f"{split}/{vid}.mp4", "QA": pairs})
  with open(ann / "captions.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("videoid", "page_dir", "name"))
    w.writerows(rows)
  with open(ann / "qa.json", "w") as f:
    json.dump(qa, f, indent=1)
  with open(ann / "attributes.json", "w") as f:
    json.dump({f"{split}_{i:05d}": a for i, a in enumerate(attributes)}, f, indent=1)


def _replaceable(d: Path) -> bool:
  """Only an empty directory or one laid out as ours is replaced."""
  return set(os.listdir(d)) <= {"videos", "annotations", "manifest.json"}


def generate(directory, num_train: int = 1000, num_test: int = 200, seed: int = 0,
             workers: int | None = None) -> Path:
  """Write the dataset into `directory` (see the module docstring) and return its Path.

  Returns at once when `directory` already holds a complete dataset with these parameters;
  otherwise generates into a temporary sibling and renames it into place, replacing a partial
  or different dataset there (a non-empty directory of other files raises ConfigError).
  `workers`: encoding threads (None: one per core, at most 8).
  """
  d = Path(directory).absolute()
  manifest = _manifest(num_train, num_test, seed)
  if is_complete(d, manifest):
    return d
  if d.exists() and not _replaceable(d):
    raise ConfigError(f"synthetic data directory {str(d)!r} holds files that are not a synthetic dataset; "
                      "not overwriting it (give an empty or new directory)")
  d.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.partial-", dir=d.parent))
  try:
    jobs = []
    for split, n in manifest["splits"].items():
      (tmp / "videos" / split).mkdir(parents=True)
      attributes = assign_attributes(n, seed, split)
      _write_annotations(tmp, split, seed, attributes)
      jobs += [(tmp, seed, split, i, a) for i, a in enumerate(attributes)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1:
      with ThreadPoolExecutor(workers) as pool:
        list(pool.map(_write_sample, jobs))
    else:
      for job in jobs:
        _write_sample(job)
    with open(tmp / "manifest.json", "w") as f:
      json.dump(manifest, f, indent=1)
    if is_complete(d, manifest):  # another process finished first
      shutil.rmtree(tmp)
      return d
    if d.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{d.name}.old-", dir=d.parent))
      d.rename(old / "data")
      tmp.rename(d)
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(d)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return d


def load_attributes(directory, split: str = "test") -> dict[str, dict]:
  """{id: {attribute: value}} of one split."""
  with open(Path(directory) / "annotations" / split / "attributes.json") as f:
    return json.load(f)


def text_corpus(directory, splits=None) -> list[str]:
  """Every caption, question and answer of the dataset (all splits unless `splits` is given),
  for pre-training a tiny language model on the dataset's text."""
  d = Path(directory)
  if splits is None:
    splits = list((_read_json(d / "manifest.json") or {}).get("splits", SPLITS))
  out = []
  for split in splits:
    with open(d / "annotations" / split / "captions.csv", newline="") as f:
      out += [row["name"] for row in csv.DictReader(f)]
    with open(d / "annotations" / split / "qa.json") as f:
      out += [text for item in json.load(f) for pair in item["QA"] for text in (pair["q"],
              pair["a"])]
  return out


def parse_answer(text: str, attribute: str) -> str | None:
  """The value of `attribute` that `text` names (aliases allowed); None when it names none, or
  more than one ("left or right" is no answer)."""
  vocab, aliases = VOCAB[attribute], ALIASES.get(attribute, {})
  named = {word if word in vocab else aliases[word]
           for word in re.findall(r"[a-z]+", text.lower()) if word in vocab or word in aliases}
  return named.pop() if len(named) == 1 else None


def score_answers(answers: dict, attributes: dict) -> dict[str, float]:
  """Accuracy per attribute: `answers` {id: {attribute: answer text}} against `attributes`
  {id: {attribute: value}}. Every attribute asked about for any id is scored over all ids of
  `answers`; an id without that answer, or an answer naming no value or several, counts as wrong."""
  asked = [a for a in ATTRIBUTES if any(a in ans for ans in answers.values())]
  scores = {}
  for a in asked:
    right = sum(parse_answer(ans[a], a) == attributes[vid][a]
                for vid, ans in answers.items() if a in ans)
    scores[a] = right / len(answers)
  return scores
