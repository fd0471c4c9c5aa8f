"""The embedded default job around the synthetic dataset (`data/synthetic.py`).

  1. generate the dataset and its media cache (decoded frames and filterbanks, once);
  2. train a SentencePiece tokenizer on its text and pre-train a tiny LLaMA on its conversations
     ("stage 0", `synthetic_text.py`: as in the paper, the LLM is frozen *and pretrained*);
  3. pre-train the tiny vision tower on still frames (`synthetic_vision.py`), as EVA / BLIP-2 arrive
     pretrained, and write the starting directory: frozen encoders (the audio one random), the
     pretrained LLM, fresh Q-Formers;
  4. (the generic loop trains both Q-Formers on the dataset's VideoChat-style QA);
  5. answer every held-out question greedily and report accuracy per attribute.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from vllama_jax.convert.output import write_atomically
from vllama_jax.data import synthetic
from vllama_jax.train import synthetic_text
from vllama_jax.train.synthetic_vision import pretrain_vision

TEMPLATE = "llama_2"
# Initialised as the reference initialises what trains (BERT's N(0, 0.02)); the frozen random
# encoders get fan-in scaled kernels instead, so that their attention is not uniform.
TRAINABLE = ("video_branch.video_qformer", "video_branch.llama_proj", "audio_branch.audio_qformer",
             "audio_branch.audio_llama_proj")


def model_config(config, vocab_size: int):
  """The tiny Video-LLaMA of `config.model`."""
  from vllama_jax.config import LlamaConfig
  from vllama_jax.models.audio_branch import AudioBranchConfig
  from vllama_jax.models.eva_vit import EvaVitConfig
  from vllama_jax.models.imagebind import ImageBindConfig
  from vllama_jax.models.qformer import QFormerConfig
  from vllama_jax.models.video_branch import VideoBranchConfig
  from vllama_jax.models.video_llama import VideoLlamaConfig
  m = config.model
  h = m.llm_hidden
  llama = LlamaConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=m.llm_ffn, num_layers=m.llm_layers,
                      num_heads=m.llm_heads, num_kv_heads=m.llm_heads, rms_norm_eps=1e-6,
                      max_position_embeddings=512, dtype="float32", scan_layers=True)
  vit = EvaVitConfig(image_size=config.data.size, patch_size=m.patch_size, width=m.vit_width, depth=m.vit_depth,
                     heads=4, mlp_dim=4 * m.vit_width, dtype="float32")
  qf = dict(hidden_size=m.qformer_width, num_heads=4, intermediate_size=4 * m.qformer_width)
  image_q = QFormerConfig.tiny(encoder_width=vit.width, num_query_tokens=m.image_queries, **qf)
  video_q = QFormerConfig.tiny(encoder_width=image_q.hidden_size, num_layers=2, cross_attention_freq=1,
                               num_query_tokens=config.data.num_query_tokens, **qf)
  video = VideoBranchConfig(vit=vit, image_qformer=image_q, video_qformer=video_q, llm_hidden_size=h,
                            max_frames=32)
  audio_enc = ImageBindConfig.tiny_audio(input_size=(128, 204), kernel_size=16, stride=16,
                                         width=m.audio_width, heads=4, mlp_dim=4 * m.audio_width,
                                         out_dim=m.qformer_width, dtype="float32")
  audio_q = QFormerConfig.tiny(encoder_width=audio_enc.out_dim, num_layers=2, cross_attention_freq=1,
                               num_query_tokens=8, **qf)
  audio = AudioBranchConfig(audio=audio_enc, vision=None, qformer=audio_q, llm_hidden_size=h, train_on="audio")
  return VideoLlamaConfig(llama=llama, video=video, audio=audio)


def prepare(config, workdir: str, log=print) -> str:
  """Steps 1-3; returns the starting directory (kept and reused when complete)."""
  from vllama_jax.pretrained import load_llama, save_video_llama
  from vllama_jax.random_checkpoint import write_tokenizer
  from vllama_jax.text.tokenizer import Tokenizer
  s = config.synthetic
  data_dir = s.data_dir or os.path.join(workdir, "data")
  log(f"[1/5] synthetic dataset in {data_dir} ({s.num_train} train / {s.num_test} held-out videos)")
  synthetic.generate(data_dir, s.num_train, s.num_test, s.seed)
  init_dir = config.init_dir or os.path.join(workdir, "init")
  if os.path.isfile(os.path.join(init_dir, "config.json")):
    log(f"[2/5] reusing the starting directory {init_dir}")
    return data_dir
  stage0_dir = os.path.join(workdir, "stage0")
  if not os.path.isfile(os.path.join(stage0_dir, "config.json")):
    with tempfile.TemporaryDirectory() as tok_dir:
      write_tokenizer(tok_dir, vocab_size=s.vocab_size, sentences=synthetic_text.conversations(config, data_dir))
      llama = _random_model(config, Tokenizer(tok_dir).vocab_size).llama
      rows = synthetic_text.described_rows(config, Tokenizer(tok_dir), data_dir, seed=config.seed)
      log(f"[2/5] stage 0: pre-training the {llama.config.num_layers}-layer LLM (hidden "
          f"{llama.config.hidden_size}, vocab {llama.config.vocab_size}) on {len(rows)} training conversations, "
          "the media slots holding the attribute words among filler")
      synthetic_text.pretrain_text(llama, rows, steps=s.text_steps, batch_size=s.text_batch_size, lr=s.text_lr,
                                   seed=config.seed, slot_noise=s.slot_noise, log=log)
      held_out = synthetic_text.described_rows(config, Tokenizer(tok_dir), data_dir, "test", variants=1,
                                               seed=config.seed)
      read = synthetic_text.reading_accuracy(llama, Tokenizer(tok_dir), held_out)
      log("  held-out answer words read from the slots: " + ", ".join(f"{k} {v:.1%}" for k, v in read.items()))
      _save_llama(llama, stage0_dir, tok_dir)
  else:
    log(f"[2/5] reusing the stage-0 LLM in {stage0_dir}")
  model = _random_model(config, Tokenizer(stage0_dir).vocab_size)
  log(f"[3/5] pre-training the vision tower on {s.vision_clips} x 4 still frames")
  scores = pretrain_vision(model.video_branch, steps=s.vision_steps, batch_size=s.vision_batch_size,
                           lr=s.vision_lr, seed=config.seed, clips=s.vision_clips, log=log)
  log(f"  held-out stills: colour {scores['colour']:.1%}, shape {scores['shape']:.1%}, centre within "
      f"{scores['centre_px']:.1f} px")
  model.llama = load_llama(stage0_dir, scan_layers=True)
  save_video_llama(model, init_dir, stage0_dir, template=TEMPLATE)
  log(f"  starting directory (frozen encoders and LLM, fresh Q-Formers): {init_dir}")
  return data_dir


def _random_model(config, vocab_size: int):
  from vllama_jax.models.video_llama import VideoLLaMA
  from vllama_jax.random_checkpoint import _random_leaves
  from vllama_jax.sharding import abstract_model
  cfg = model_config(config, vocab_size)
  graphdef, state = abstract_model(lambda: VideoLLaMA(cfg, rngs=nnx.Rngs(0)))
  leaves = _random_leaves(nnx.to_pure_dict(state), np.random.default_rng(config.seed), small_kernels=TRAINABLE)
  nnx.replace_by_pure_dict(state, leaves)
  return nnx.merge(graphdef, state)


def _save_llama(llama, directory: str, tokenizer_dir: str) -> None:
  from vllama_jax.convert.output import staged_output
  from vllama_jax.pretrained import LLAMA, copy_tokenizer, save_params, write_config
  with staged_output(directory) as staging:
    copy_tokenizer(tokenizer_dir, staging)
    save_params(staging, {LLAMA: nnx.to_pure_dict(nnx.state(llama))})
    write_config(staging, {LLAMA: llama.config.to_hf()})


def setup(config, workdir: str, log=print) -> str:
  """`prepare` (on process 0), point the config's init_dir and dataset paths at the results and, with
  `synthetic.cache`, build the media cache there and train from it; returns the dataset directory."""
  main = jax.process_index() == 0
  data_dir = prepare(config, workdir, log=log) if main else None
  data_dir = data_dir or config.synthetic.data_dir or os.path.join(workdir, "data")
  with config.unlocked():
    config.init_dir = config.init_dir or os.path.join(workdir, "init")
    for spec in config.data.datasets:
      if not spec["ann"]:
        spec.update(ann=os.path.join(data_dir, "annotations", "train", "qa.json"),
                    media=os.path.join(data_dir, "videos"),
                    eval_ann=os.path.join(data_dir, "annotations", "test", "qa.json"),
                    eval_media=os.path.join(data_dir, "videos"))
    if config.synthetic.get("cache", False) and not config.data.cache_dir:
      config.data.cache_dir = os.path.join(data_dir, "cache")
    if config.synthetic.get("frozen_features", False) and not config.data.get("features_dir"):
      config.data.features_dir = features_dir(data_dir, config.init_dir)
  if main and config.synthetic.get("cache", False):
    from vllama_jax.data.build import data_config
    from vllama_jax.data.cache import video_paths
    from vllama_jax.data.media_cache import build_cache
    cfg = data_config(config, train=True)
    build_cache(video_paths(config), config.data.cache_dir, num_frames=cfg.num_frames, size=cfg.size,
                audio=cfg.audio, quiet=True)
    log(f"  media cache (decoded frames and filterbanks): {config.data.cache_dir}")
  if main and config.data.get("features_dir"):
    _frozen_features(config, log)
  return data_dir


def features_dir(data_dir: str, init_dir: str) -> str:
  """Where the job keeps the frozen features of `init_dir`'s encoders (one directory per start directory,
  so that runs sharing the data, like the ablation, share them)."""
  start = hashlib.sha256(os.path.abspath(init_dir).encode()).hexdigest()[:12]
  return os.path.join(data_dir, "frozen_features", start)


def _frozen_features(config, log) -> None:
  """The frozen encoders' outputs for every video; rebuilt when the start directory's encoders changed
  (a cache of this job's own, in its data directory)."""
  from vllama_jax.data.frozen_features import INDEX, FrozenFeatures, build_features
  directory = config.data.features_dir
  if os.path.isfile(os.path.join(directory, INDEX)) and not FrozenFeatures(directory).computed_from(config.init_dir):
    shutil.rmtree(directory)
  start = time.time()
  build_features(config, directory)
  log(f"  frozen encoders' outputs for every video ({time.time() - start:.0f} s): {directory}")


def answer_held_out(config, directory: str, data_dir: str, limit: int | None = None,
                    answers_path: str | None = None, log=print) -> tuple[dict[str, float], dict[str, float]]:
  """Step 5: every held-out question asked alone (first turn, media in front, as in training),
  greedy. Returns the accuracy per attribute and, as the bar to beat, the share of the most common
  value among the videos scored (25% over the whole held-out split, more over a part of it).
  `answers_path` gets one JSON line per question: video, attribute, question, answer, the value
  the answer names (null for none or several) and the truth."""
  from vllama_jax.infer.chat import VideoChat
  from vllama_jax.train.evaluation import training_style
  chat = VideoChat.from_pretrained(directory, template=TEMPLATE, num_frames=config.data.num_frames,
                                   video_options=dict(config.get("video_options", {})))
  attributes = synthetic.load_attributes(data_dir, "test")
  with open(os.path.join(data_dir, "annotations", "test", "qa.json")) as f:
    items = json.load(f)[:limit]
  requests, keys = [], []
  for item in items:
    vid = os.path.splitext(os.path.basename(item["video"]))[0]
    for pair in item["QA"]:
      attribute = next(a for a in synthetic.ATTRIBUTES if synthetic.parse_answer(pair["a"], a) is not None)
      requests.append((os.path.join(data_dir, "videos", item["video"]), pair["q"]))
      keys.append((vid, attribute))
  answers: dict = {}
  sampling = chat.sampling(max_new_tokens=12, greedy=True)
  batch = config.eval.get("batch_size", 16)
  videos = list(dict.fromkeys(p for p, _ in requests))  # each encoded once
  media = {}
  for chunk in _even_chunks(videos, batch):
    media.update(zip(chunk, chat.encode_many([_request(p) for p in chunk])))
  for chunk in _even_chunks(list(zip(requests, keys)), batch):
    convs = [training_style(chat, media[p], q) for (p, q), _ in chunk]
    out = chat.generate(convs, [media[p] for (p, _), _ in chunk], sampling=sampling)
    for (_, (vid, attribute)), text in zip(chunk, out):
      answers.setdefault(vid, {})[attribute] = text
  scores = synthetic.score_answers(answers, attributes)
  if answers_path:
    lines = [json.dumps({"video": vid, "attribute": a, "question": q, "answer": answers[vid][a],
                         "named": synthetic.parse_answer(answers[vid][a], a), "truth": attributes[vid][a]})
             for (_, q), (vid, a) in zip(requests, keys)]
    write_atomically(answers_path, "".join(line + "\n" for line in lines))
  most_common = {a: max(collections.Counter(attributes[vid][a] for vid in answers).values()) / len(answers)
                 for a in scores}
  example = next(iter(answers.items()))
  log(f"  e.g. {example[0]}: {example[1]} (truth {attributes[example[0]]})")
  return scores, most_common


def _even_chunks(items: list, most: int) -> list[list]:
  """`items` in chunks of at most `most`, as even as can be (one padded batch shape: one compile)."""
  count = -(-len(items) // most)
  size = -(-len(items) // max(count, 1))
  return [items[i:i + size] for i in range(0, len(items), size)]


def _request(path):
  from vllama_jax.infer.chat import Request
  return Request("", video=path)
