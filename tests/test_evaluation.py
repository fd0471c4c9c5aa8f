"""What the loop's sample answers feed the model: the training text up to the answer (or up to the
caption), and the media rows of the stage being trained (AL stages: frames through ImageBind's
vision tower)."""

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
from vllama_jax.data.text import PLACEHOLDER  # noqa: E402
from vllama_jax.infer.chat import VideoChat  # noqa: E402
from vllama_jax.media.video import load_video  # noqa: E402
from vllama_jax.models.imagebind import ImageBindConfig  # noqa: E402
from vllama_jax.models.video_llama import VideoLLaMA, VideoLlamaConfig  # noqa: E402
from vllama_jax.random_checkpoint import write_tokenizer  # noqa: E402
from vllama_jax.text.conversation import TEMPLATES  # noqa: E402
from vllama_jax.text.prompt import layout  # noqa: E402
from vllama_jax.text.tokenizer import Tokenizer  # noqa: E402
from vllama_jax.train.evaluation import CaptionPrompt, stage_media, training_style  # noqa: E402

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
  video, silent = str(d / "av.mp4"), str(d / "silent.mp4")
  write_media(video, tone_mix(2.0, 16000), video_seconds=2.0)
  write_media(silent, None, video_seconds=2.0)
  return chat, video, silent


@pytest.mark.parametrize("num_frames", [4, 12])
def test_al_stage_media_are_the_audio_branch_on_the_frames(al_chat, num_frames):
  chat, video, _ = al_chat
  chat = VideoChat(chat.model, chat.tokenizer, chat.template, num_frames=num_frames)
  [media] = stage_media(chat, "audio_vision", [video], size=224)
  sampled = load_video(video, num_frames, 224)
  keep = chat.model.config.audio.num_positions  # 8: the step feeds the first 8 of more frames
  expected = jax.jit(lambda m, f: m.audio_branch.encode_frames(f))(chat.model, sampled.frames[None, :keep])[0]
  assert media.mode == "video" and media.time_hint == sampled.time_hint
  [rows] = media.embeddings
  assert rows.shape == (chat.model.config.audio.qformer.num_query_tokens, chat.model.config.llama.hidden_size)
  np.testing.assert_allclose(np.asarray(rows), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_other_stages_media(al_chat):
  chat, video, silent = al_chat
  cfg = chat.model.config
  for mode, rows in (("video", [cfg.video.video_qformer.num_query_tokens]),
                     ("audio_video", [cfg.audio.qformer.num_query_tokens, cfg.video.video_qformer.num_query_tokens]),
                     ("audio", [cfg.audio.qformer.num_query_tokens])):
    media, without_sound = stage_media(chat, mode, [video, silent], size=224)
    assert media.mode == mode and [e.shape[0] for e in media.embeddings] == rows
    if mode == "video":
      assert without_sound.mode == "video"
    else:  # what the mode needs is missing: training skips such a video as "no audio"
      assert without_sound is None


@pytest.mark.parametrize("template,data_template", [("vicuna", "vicuna"), ("llama_2", "llama_v2")])
@pytest.mark.parametrize("mode", ["video", "audio_video"])
def test_the_prompt_tokens_are_the_training_tokens_up_to_the_answer(al_chat, template, data_template, mode):
  chat, _, _ = al_chat
  chat = VideoChat(chat.model, chat.tokenizer, TEMPLATES[template])
  runs = (2, 3) if mode == "audio_video" else (3,)
  turns = text.videochat_turns([{"q": QUESTION, "a": ANSWER}], HINT, runs)
  training = text.instruction_example(chat.tokenizer, turns, data_template, runs)
  prompt = layout(chat.tokenizer, training_style(chat, SimpleNamespace(mode=mode, time_hint=HINT), QUESTION).prompt(),
                  runs)
  n = len(prompt.ids)
  np.testing.assert_array_equal(training["ids"][:n], prompt.ids)
  np.testing.assert_array_equal(training["source"][:n], prompt.source)
  assert training["labels"][n] != -100  # the answer's first token, a target, comes next
  if template == "llama_2":  # (Vicuna's labels keep "###Assistant:" and a human turn's first two tokens)
    assert (training["labels"][:n] == -100).all()


@pytest.mark.parametrize("prompt", [None, "###Human: <Video><ImageHere></Video> Describe this video. ###Assistant: "])
def test_a_caption_prompt_is_the_caption_paths_text_before_the_caption(al_chat, prompt):
  chat, _, _ = al_chat
  runs = (2, 3)  # both runs in the prompt's one placeholder
  training = text.caption_example(chat.tokenizer, "A dog runs.", runs, prompt)
  ours = layout(chat.tokenizer, CaptionPrompt(prompt or PLACEHOLDER).prompt(), [sum(runs)])
  n = len(ours.ids)
  np.testing.assert_array_equal(training["ids"][:n], ours.ids)
  np.testing.assert_array_equal(training["source"][:n], ours.source)
  assert (training["labels"][:n] == -100).all() and (training["labels"][n:] != -100).any()
