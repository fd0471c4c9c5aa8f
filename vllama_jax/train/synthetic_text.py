"""Stage 0 of the synthetic job: pre-training the tiny LLM that will then be frozen.

Video-LLaMA's LLM is frozen *and pretrained*: it already answers questions about whatever its
prompt says. A tiny LLM has to learn that here, from the dataset itself. It is trained on exactly
the conversations the Q-Formers will be trained on (the LLaMA-2 template, the `<Audio>` / `<Video>`
tags, the time hint, the QA turns), except that each run of media slots holds the sample's
attribute words (the sound; the colour, shape and direction) at random places among random filler
tokens. It thereby learns to answer from whichever slot holds the word it needs, whatever stands
in the others: the slots where the Q-Formers will write, in places of their own choosing.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vllama_jax.data import synthetic, text
from vllama_jax.data.samples import AUDIO_ROWS
from vllama_jax.errors import ConfigError
from vllama_jax.media.video import sample_indices, time_hint
from vllama_jax.train.fit import fit


def slot_words(attrs: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The words stage 0 writes where the audio and the video tokens will go."""
  return (attrs["sound"],), (attrs["colour"], attrs["shape"], attrs["direction"])


def runs(config) -> tuple[int, int]:
  """The audio and video slot runs of a training prompt."""
  return AUDIO_ROWS, config.data.num_query_tokens


def _records(data_dir: str, split: str) -> list[tuple[dict, dict]]:
  """(qa.json item, attributes) of every sample of a split."""
  with open(os.path.join(data_dir, "annotations", split, "qa.json")) as f:
    items = json.load(f)
  attributes = synthetic.load_attributes(data_dir, split)
  return [(item, attributes[os.path.splitext(os.path.basename(item["video"]))[0]]) for item in items]


def _turns(config, item: dict) -> list[dict]:
  """The turns the training pipeline renders for `item` (every synthetic video has the same time hint)."""
  hint = time_hint(sample_indices(synthetic.NUM_FRAMES, config.data.num_frames), synthetic.FPS)
  return text.videochat_turns(item["QA"], hint, runs(config))


def conversations(config, data_dir: str, split: str = "train") -> list[str]:
  """Stage-0 text as strings, to train the tokenizer on: the conversations with their attribute
  words in the slots, and every caption, question and answer."""
  out = []
  for item, attrs in _records(data_dir, split):
    prompt = text.llama2_prompt(_turns(config, item))
    for n, words in zip(runs(config), slot_words(attrs)):
      prompt = prompt.replace(text.PLACEHOLDER * n, " " + " ".join(words) + " ", 1)
    out.append(prompt)
  return out + synthetic.text_corpus(data_dir, splits=(split,))


def described_rows(config, tokenizer, data_dir: str, split: str = "train", variants: int = 4,
                   seed: int = 0) -> list[tuple[list[int], list[bool], list[bool]]]:
  """Stage-0 rows (token ids, answer-target flags, slot flags): each training example's ids with
  its slot runs filled as the module docstring says, `variants` random fillings per sample."""
  slot_runs = runs(config)
  words = {v: tokenizer.encode(v) for values in synthetic.VOCAB.values() for v in values}
  filler = sorted({t for q in synthetic.text_corpus(data_dir, splits=(split,)) for t in tokenizer.encode(q)}
                  - {t for ids in words.values() for t in ids})
  tokenizer.add_tokens([text.PLACEHOLDER])
  starts = {sum(slot_runs[:k]): k for k in range(len(slot_runs))}  # first slot of each run -> run
  rng = np.random.default_rng([seed, 0x5107])
  rows = []
  for item, attrs in _records(data_dir, split):
    ex = text.instruction_example(tokenizer, _turns(config, item), "llama_v2", slot_runs, max_len=1024)
    for _ in range(variants):
      slots = [_fill(n, [words[w] for w in ws], filler, rng) for n, ws in zip(slot_runs, slot_words(attrs))]
      ids, target, slot = [], [], []
      for t, src, label in zip(ex["ids"].tolist(), ex["source"].tolist(), ex["labels"].tolist()):
        if src < 0:
          ids.append(t)
          target.append(label != text.IGNORE)
          slot.append(False)
        elif src in starts:
          n = len(slots[starts[src]])
          ids.extend(slots[starts[src]])
          target.extend([False] * n)
          slot.extend([True] * n)
      rows.append((ids, target, slot))
  return rows


def _fill(n: int, words: list[list[int]], filler: list[int], rng) -> list[int]:
  """n tokens: the words' tokens (each word kept whole) and filler, in random order."""
  spare = n - sum(map(len, words))
  if spare < 0:
    raise ConfigError(f"{sum(map(len, words))} tokens of attribute words do not fit {n} slots")
  pieces = list(words) + [[int(t)] for t in rng.choice(filler, spare)]
  return [t for i in rng.permutation(len(pieces)) for t in pieces[i]]


def _pad(rows):
  length = -(-max(len(r[0]) for r in rows) // 16) * 16
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  target = np.zeros((len(rows), length), bool)
  slot = np.zeros((len(rows), length), bool)
  for i, (r, t, s) in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)], target[i, :len(t)], slot[i, :len(s)] = r, 1, t, s
  return ids, mask, target, slot


def pretrain_text(llama, rows, *, steps: int, batch_size: int, lr: float, seed: int, slot_noise: float = 0.0,
                  log=print) -> float:
  """Next-token training of every LLaMA parameter on all tokens of `rows`; returns the last loss.

  `slot_noise` adds Gaussian noise of that many times the embeddings' RMS to the embedded slot tokens,
  so that the LLM learns to read approximate embeddings there, as the Q-Formers will first write."""
  ids, mask, _, slot = _pad(rows)
  graphdef, params = nnx.split(llama)

  def loss_fn(p, ids, mask, slot, key):
    model = nnx.merge(graphdef, p)
    x = model.embed(ids)
    rms = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(model.embed_tokens[...]))))
    x = x + jnp.where(slot[..., None], slot_noise * rms * jax.random.normal(key, x.shape, x.dtype), 0.0)
    logits = model(inputs_embeds=x, attention_mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.sum(w)

  params, loss = fit(loss_fn, params, (ids, mask, slot), steps=steps, batch_size=batch_size, lr=lr,
                     warmup=max(steps // 20, 1), decay_steps=steps, seed=seed, keyed=True,
                     progress="  stage 0 step {step}/{steps}: text loss {loss:.3f}", log=log)
  nnx.update(llama, params)
  return loss


def reading_accuracy(llama, tokenizer, rows) -> dict[str, float]:
  """Per attribute, how often the LLM's top next token is the right attribute word where an answer
  names it (teacher forcing): the share of questions it answers from the slots' words."""
  word_of = {}
  for attribute, values in synthetic.VOCAB.items():
    for v in values:
      word_of[tokenizer.encode(v)[0]] = attribute
  ids, mask, target, _ = _pad(rows)
  graphdef, params = nnx.split(llama)
  top = jax.jit(lambda p, i, m: jnp.argmax(nnx.merge(graphdef, p)(i, attention_mask=m), axis=-1))
  hits = {a: [0, 0] for a in synthetic.ATTRIBUTES}
  for start in range(0, len(ids), 64):
    pred = np.asarray(top(params, ids[start:start + 64], mask[start:start + 64]))
    for i, j in zip(*np.nonzero(target[start:start + 64, 1:])):
      attribute = word_of.get(int(ids[start + i, j + 1]))
      if attribute is not None:
        hits[attribute][0] += int(pred[i, j] == ids[start + i, j + 1])
        hits[attribute][1] += 1
  return {a: h / n for a, (h, n) in hits.items() if n}
