"""The synthetic job's pre-training stages: stage 0's rows are the training examples with attribute
words in the media slots; the vision tower's still frames come with their labels."""

import numpy as np
import pytest

from vllama_jax.cli import load_config_file
from vllama_jax.data import synthetic, text
from vllama_jax.random_checkpoint import write_tokenizer
from vllama_jax.text.tokenizer import Tokenizer
from vllama_jax.train import synthetic_text
from vllama_jax.train.synthetic_vision import render_stills

CONFIG = "configs/synthetic.py"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("job")
  data = synthetic.generate(root / "data", num_train=16, num_test=4, seed=1, workers=1)
  config = load_config_file(CONFIG)
  words = " ".join(v for values in synthetic.VOCAB.values() for v in values)  # each becomes one token
  write_tokenizer(str(root / "tok"), vocab_size=400,
                  sentences=synthetic_text.conversations(config, str(data)) + [words] * 50)
  return config, str(data), str(root / "tok")


def test_stage0_rows_are_the_training_examples_with_the_words_in_the_slots(prepared):
  config, data, tok_dir = prepared
  rows = synthetic_text.described_rows(config, Tokenizer(tok_dir), data, variants=3, seed=0)
  records = synthetic_text._records(data, "train")
  assert len(rows) == 3 * len(records)
  tok = Tokenizer(tok_dir)
  tok.add_tokens([text.PLACEHOLDER])
  word_ids = {v: tok.encode(v) for values in synthetic.VOCAB.values() for v in values}
  attribute_tokens = {t for ids in word_ids.values() for t in ids}
  placements = set()
  for k, (item, attrs) in enumerate(records):
    ex = text.instruction_example(tok, synthetic_text._turns(config, item), "llama_v2", (8, 8), max_len=1024)
    slots = np.flatnonzero(ex["source"] >= 0)
    assert len(slots) == 16 and slots[7] - slots[0] == 7 and slots[15] - slots[8] == 7  # audio, video runs
    for ids, target, slot in rows[3 * k:3 * k + 3]:
      ids, target, slot = np.asarray(ids), np.asarray(target), np.asarray(slot)
      assert len(ids) == len(ex["ids"]) == len(target) == len(slot)  # every word is one token here
      outside = ex["source"] < 0
      np.testing.assert_array_equal(slot, ~outside)
      np.testing.assert_array_equal(ids[outside], ex["ids"][outside])
      np.testing.assert_array_equal(target, ex["labels"] != text.IGNORE)
      audio, video = ids[slots[:8]], ids[slots[8:]]
      for run, words in zip((audio, video), synthetic_text.slot_words(attrs)):
        wanted = sorted(t for w in words for t in word_ids[w])
        assert sorted(t for t in run if t in attribute_tokens) == wanted  # the words, no others
      placements.add(tuple(np.flatnonzero(np.isin(video, list(attribute_tokens)))))
  assert len(placements) > 10  # the words move around the slots


def test_stage0_rows_need_the_words_to_fit(prepared):
  config, data, tok_dir = prepared
  with config.unlocked():
    config.data.num_query_tokens = 2
  with pytest.raises(Exception, match="do not fit 2 slots"):
    synthetic_text.described_rows(config, Tokenizer(tok_dir), data)


def test_still_frames_come_with_their_labels():
  """The vision tower's pre-training data (that it learns from them, tests/test_synthetic_learns.py checks
  on the job's own run)."""
  frames, colours, shapes, centres = render_stills(8, seed=0)
  assert frames.shape == (32, 64, 64, 3) and centres.shape == (32, 2) and np.abs(centres).max() < 1
  assert set(colours) <= {0, 1, 2, 3} and set(shapes) <= {0, 1, 2, 3}
  again = render_stills(8, seed=0)
  np.testing.assert_array_equal(frames, again[0])
  assert not np.array_equal(frames, render_stills(8, seed=1)[0])
