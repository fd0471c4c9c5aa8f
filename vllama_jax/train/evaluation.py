"""Generated answers during and after training, prompted the way the training data is rendered.

The instruction datasets put the media in front of the first question ("<Video>" + N slots +
"</Video> " + time hint + question; audio+video adds an "<Audio>" run first) inside the training
template, which differs from the demo's first message (spec 7, item 7); asking in the training
style measures what the run learned. A caption dataset's video gets the caption path's text that
comes before the caption (the stage's caption prompt, or the rows alone) and is captioned. The
rows come from what the stage trains: in the AL stages (mode "audio_vision") the frames go through
ImageBind's vision tower and the audio Q-Former.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vllama_jax.data.text import PLACEHOLDER, TAGS
from vllama_jax.media import MediaError
from vllama_jax.text.conversation import PLACEHOLDERS, TEMPLATES, Conversation


def training_style(chat, media, question: str) -> Conversation:
  """A one-question conversation rendered as `data.text.videochat_turns` and the template's
  training text render the first turn: up to the answer, the prompt is the training text."""
  prefix = " ".join(f"{TAGS[k][0]}<ImageHere>{TAGS[k][1]}" for k in PLACEHOLDERS[media.mode])
  message = f"{prefix} {media.time_hint}{question}"
  if chat.template.name == "llama_2":
    conversation = Conversation(chat.template, " ")  # the training prompt's empty system
  else:  # Vicuna's training text: "\n\n###Human: ...\n###Assistant: ...\n###"
    conversation = Conversation(chat.template, "\n\n")
    message += "\n"
  conversation.messages.append([chat.template.roles[0], message])
  return conversation


def _frames_through_audio_branch(graphdef, state, frames):
  return nnx.merge(graphdef, state).audio_branch.encode_frames(frames)


_frames_through_audio_branch = jax.jit(_frames_through_audio_branch, static_argnums=0)


def stage_media(chat, mode: str, videos: list[str], size: int) -> list:
  """Each video encoded as a training batch of `mode` feeds the LLM (`step.modality_rows`); None
  for a video without what the mode needs (no audio track, or unreadable), which training skips."""
  from vllama_jax.infer.chat import Media, Request
  if mode == "audio_vision":  # the first audio-position-table rows' worth of frames, as the step takes
    from vllama_jax.media.video import load_video
    sampled = [load_video(v, chat.num_frames, size) for v in videos]
    keep = chat.model.audio_branch.config.num_positions
    rows = chat.encode_grouped([s.frames[:keep] for s in sampled], _frames_through_audio_branch)
    return [Media("video", [r], s.time_hint, s, v) for r, s, v in zip(rows, sampled, videos)]
  if mode == "audio":
    return [_audio_only(chat, v) for v in videos]
  media = chat.encode_many([Request("", video=v, use_audio=mode == "audio_video") for v in videos])
  return [m if m.mode == mode else None for m in media]  # audio_video: a video without sound is None


def _audio_only(chat, video: str):
  try:
    return chat.encode(audio=video)
  except MediaError:
    return None


def chat_from_state(config, graphdef, params, frozen):
  """A VideoChat over the parameters being trained (nothing is copied or saved)."""
  from vllama_jax.infer.chat import VideoChat
  from vllama_jax.text.tokenizer import Tokenizer
  model = nnx.merge(graphdef, params, frozen)
  return VideoChat(model, Tokenizer(config.init_dir), TEMPLATES[config.template],
                   num_frames=config.data.num_frames)


@dataclasses.dataclass(frozen=True)
class CaptionPrompt:
  """A caption dataset's training text before the caption (`data.text.caption_example`): the
  stage's first caption prompt, its one <ImageHere> taking every row, or the rows alone. Generated
  from like a Conversation."""
  text: str = PLACEHOLDER

  def prompt(self) -> str:
    return self.text


def first_questions(config, limit: int) -> list[tuple[str, str | None]]:
  """(media path, first question; None for a caption record) of the first usable held-out videos."""
  from vllama_jax.data.build import records_of
  out = []
  for spec in config.data.datasets:
    for record in records_of(spec, train=False):
      if record.get("broken") or record.get("media_type") != "video":
        continue
      if record["kind"] == "videochat":
        out.append((record["media"], record["qa"][0]["q"]))
      elif record["kind"] == "caption":
        out.append((record["media"], None))
      if len(out) >= limit:
        return out
  return out


def sample_answers(config, graphdef, params, frozen) -> list[str]:
  """A few greedy answers to held-out questions, and captions of held-out caption videos, as log
  lines."""
  from vllama_jax.data.build import data_config
  questions = first_questions(config, config.eval.generate)
  if not questions:
    return []
  cfg = data_config(config, train=False)
  chat = chat_from_state(config, graphdef, params, frozen)
  media = stage_media(chat, config.mode, [path for path, _ in questions], cfg.size)
  asked = [(q, m) for (_, q), m in zip(questions, media) if m is not None]
  if not asked:
    return []
  prompts, rows = [], []
  for q, m in asked:
    if q is None:  # all the rows in the caption prompt's one placeholder
      prompts.append(CaptionPrompt(cfg.prompts[0] if cfg.prompts else PLACEHOLDER))
      rows.append(dataclasses.replace(m, embeddings=[jnp.concatenate(m.embeddings)]))
    else:
      prompts.append(training_style(chat, m, q))
      rows.append(m)
  answers = chat.generate(prompts, rows, sampling=chat.sampling(max_new_tokens=24, greedy=True))
  return [f"  Q: {q}  A: {a}" if q is not None else f"  caption: {a.split(cfg.end_sym)[0].strip()}"
          for (q, _), a in zip(asked, answers)]
