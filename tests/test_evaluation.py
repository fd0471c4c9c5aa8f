"""What the loop's sample answers feed the model: the training text up to the answer, and the media
rows of the stage being trained (AL stages: frames through ImageBind's vision tower)."""

import dataclasses
import os
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from media_fixtures import tone_mix, write_media  # noqa: E402

from vllama_jax.data import text  # noqa: E402
from vllama_jax.infer.chat import VideoChat  # noqa: E402
from vllama_jax.media.video import load_video  # noqa: E402
from vllama_jax.models.imagebind import ImageBindConfig  # noqa: E402
from vllama_jax.models.video_llama import VideoLLaMA, VideoLlamaConfig  # noqa: E402
from vllama_jax.random_checkpoint import write_tokenizer  # noqa: E402
from vllama_jax.text.conversation import TEMPLATES  # noqa: E402
from vllama_jax.text.tokenizer import Tokenizer  # noqa: E402
from vllama_jax.train.evaluation import stage_media, training_style  # noqa: E402

HINT = "The video contains 4 frames sampled at 0.0, 0.2, 0.5, 0.7 seconds. "
QUESTION, ANSWER = "Which way does the shape move?", "It moves left."


@pytest.mark.parametrize("template", ["vicuna", "llama_2"])
@pytest.mark.parametrize("mode", ["video", "audio_video", "audio"])
def test_the_prompt_is_the_training_text_up_to_the_answer(template, mode):
  kinds = {"video": ("video",), "audio_video": ("audio", "video"), "audio": ("audio",)}[mode]
  hint = "" if mode == "audio" else HINT  # an audio-only sample's prompt has no time hint
  turns = text.videochat_turns([{"q": QUESTION, "a": ANSWER}], hint, runs=(1,) * len(kinds), kinds=kinds)
  if template == "vicuna":
    training, rest = text.vicuna_prompt(turns), f" {ANSWER}\n###"
  else:
    training, rest = text.llama2_prompt(turns), f" {ANSWER} </s>"
  chat = SimpleNamespace(template=TEMPLATES[template])
  prompt = training_style(chat, SimpleNamespace(mode=mode, time_hint=hint), QUESTION).prompt()
  assert training == prompt + rest


@pytest.fixture(scope="module")
def al_chat(tmp_path_factory):
  """A tiny model whose audio branch has ImageBind's vision tower, as the AL stages train it."""
  d = tmp_path_factory.mktemp("evaluation")
  write_tokenizer(str(d / "tok"))
  tokenizer = Tokenizer(str(d / "tok"))
  cfg = VideoLlamaConfig.tiny(vocab_size=tokenizer.vocab_size)
  vision = ImageBindConfig.tiny_vision(out_dim=cfg.audio.audio.out_dim)
  cfg = cfg.replace(audio=dataclasses.replace(cfg.audio, vision=vision, train_on="vision"))
  chat = VideoChat(VideoLLaMA(cfg, rngs=nnx.Rngs(0)), tokenizer, TEMPLATES["vicuna"], num_frames=4)
  video = str(d / "av.mp4")
  write_media(video, tone_mix(2.0, 16000), video_seconds=2.0)
  return chat, video


def test_al_stage_media_are_the_audio_branch_on_the_frames(al_chat):
  chat, video = al_chat
  [media] = stage_media(chat, "audio_vision", [video], size=224)
  frames = load_video(video, 4, 224).frames
  expected = jax.jit(lambda m, f: m.audio_branch.encode_frames(f))(chat.model, frames[None])[0]
  assert media.mode == "video" and media.time_hint == load_video(video, 4, 224).time_hint
  [rows] = media.embeddings
  assert rows.shape == (chat.model.config.audio.qformer.num_query_tokens, chat.model.config.llama.hidden_size)
  np.testing.assert_allclose(np.asarray(rows), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_other_stages_media(al_chat):
  chat, video = al_chat
  cfg = chat.model.config
  for mode, rows in (("video", [cfg.video.video_qformer.num_query_tokens]),
                     ("audio_video", [cfg.audio.qformer.num_query_tokens, cfg.video.video_qformer.num_query_tokens]),
                     ("audio", [cfg.audio.qformer.num_query_tokens])):
    [media] = stage_media(chat, mode, [video], size=224)
    assert media.mode == mode and [e.shape[0] for e in media.embeddings] == rows
