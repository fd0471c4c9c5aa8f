"""Asking Video-LLaMA about videos, images and sounds, as the reference demo does, batched and jitted.

  chat = VideoChat.from_pretrained("converted/video-llama-2-7b")
  print(chat.ask("video.mp4", "What is happening in this video?"))

A `ChatSession` keeps the history and the encoded media, so follow-up questions re-use them.
`ask_batch` answers many (media, question) pairs as one generation batch; batch size and prompt
length are bucketed, so repeated calls of similar size never recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vllama_jax.errors import ConfigError
from vllama_jax.infer.generate import Generator, batch_bucket
from vllama_jax.infer.sampling import SamplingConfig
from vllama_jax.models.video_llama import VideoLLaMA
from vllama_jax.text import conversation as conv
from vllama_jax.text.prompt import MAX_LENGTH, crop_left, layout
from vllama_jax.text.tokenizer import Tokenizer

PLACEHOLDER_TOKENS = ["<ImageHere>", "<AudioHere>"]  # added after the vocabulary, as the reference


@dataclasses.dataclass
class Media:
  """One input encoded for the LLM: `embeddings` fill the prompt's placeholders in order."""
  mode: str  # one of conversation.MODES
  embeddings: list[jax.Array]  # (N_i, H) each
  time_hint: str = ""
  video: object | None = None  # the SampledVideo the frames came from (indices, timestamps, frames)
  source: str | None = None


@dataclasses.dataclass(frozen=True)
class Request:
  """One question about one input: a video (with its sound unless use_audio is False), an image, or
  an audio file."""
  question: str
  video: str | None = None
  image: str | None = None
  audio: str | None = None
  use_audio: bool = True


def _jit_method(name):
  def run(graphdef, state, x):
    return getattr(nnx.merge(graphdef, state), name)(x)
  return jax.jit(run, static_argnums=0)


_encode_video = _jit_method("encode_video")
_encode_audio = _jit_method("encode_audio")


class VideoChat:
  """A loaded model with its tokenizer and chat template."""

  def __init__(self, model: VideoLLaMA, tokenizer: Tokenizer, template: conv.Template, *,
               num_frames: int = 8, max_length: int = MAX_LENGTH, length_multiple: int = 64):
    if num_frames < 1:
      raise ConfigError(f"num_frames must be at least 1, got {num_frames}")
    self.model, self.tokenizer, self.template = model, tokenizer, template
    self.num_frames, self.max_length = num_frames, max_length
    tokenizer.add_tokens(PLACEHOLDER_TOKENS)
    self.generator = Generator(model.llama, length_multiple=length_multiple)
    self._graphdef, self._state = nnx.split(model)
    self.stop_sequences = conv.stop_sequences(template, tokenizer)

  @classmethod
  def from_pretrained(cls, directory: str, mesh: jax.sharding.Mesh | None = None, *, template: str | None = None,
                      audio: bool = True, video_options: dict | None = None, **options) -> "VideoChat":
    """Loads a converted directory. The template defaults to the one convert_weights.py recorded;
    `video_options` override VideoBranchConfig fields (e.g. use_frame_positions)."""
    from vllama_jax.pretrained import load_video_llama, read_chat_entry
    template = template or read_chat_entry(directory).get("template", "vicuna")
    if template not in conv.TEMPLATES:
      raise ConfigError(f"unknown chat template {template!r}; expected one of {sorted(conv.TEMPLATES)}")
    model = load_video_llama(directory, mesh, audio=audio, video_options=video_options)
    return cls(model, Tokenizer(directory), conv.TEMPLATES[template], **options)

  # ---- media --------------------------------------------------------------------------------

  def sampling(self, **changes) -> SamplingConfig:
    """The demo's sampling (top_p 0.9, temperature 1, 300 new tokens) with this template's stops."""
    return SamplingConfig(stop_sequences=self.stop_sequences, eos_token_id=self.tokenizer.eos_id,
                          pad_token_id=self.tokenizer.pad_id, **changes)

  def encode(self, video: str | None = None, *, image: str | None = None, audio: str | None = None,
             use_audio: bool = True) -> Media:
    """Encodes one input; see `encode_many`."""
    return self.encode_many([Request("", video=video, image=image, audio=audio, use_audio=use_audio)])[0]

  def encode_many(self, requests: Sequence[Request]) -> list[Media]:
    """Decodes and encodes the media of each request; same-shaped inputs run as one batch. A video
    without an audio track (or with use_audio False, or a model without audio branch) is video-only."""
    from vllama_jax.media import audio_features
    from vllama_jax.media.image import load_image
    from vllama_jax.media.video import load_video
    plans = []
    for r in requests:
      given = [k for k in ("video", "image", "audio") if getattr(r, k) is not None]
      if len(given) != 1:
        raise ConfigError(f"give exactly one of video, image or audio per request (got {given or 'none'})")
      if r.video is not None:
        sampled = load_video(r.video, self.num_frames, self._image_size())
        sound = (audio_features(r.video) if r.use_audio and self.model.audio_branch is not None else None)
        plans.append(dict(frames=sampled.frames, sound=sound, video=sampled, source=r.video,
                          mode="audio_video" if sound is not None else "video", hint=sampled.time_hint))
      elif r.image is not None:
        plans.append(dict(frames=load_image(r.image, self._image_size()), sound=None, video=None,
                          source=r.image, mode="image", hint=""))
      else:
        sound = audio_features(r.audio)
        if sound is None:
          from vllama_jax.media import MediaError
          raise MediaError(f"{r.audio}: has no audio stream")
        plans.append(dict(frames=None, sound=sound, video=None, source=r.audio, mode="audio", hint=""))
    video_rows = self.encode_grouped([p["frames"] for p in plans], _encode_video)
    audio_rows = self.encode_grouped([p["sound"] for p in plans], _encode_audio)
    media = []
    for p, v, a in zip(plans, video_rows, audio_rows):
      embeddings = [e for e in (a, v) if e is not None]  # audio fills the first placeholder
      media.append(Media(p["mode"], embeddings, p["hint"], p["video"], p["source"]))
    return media

  def _image_size(self) -> int:
    branch = self.model.video_branch
    return branch.config.vit.image_size if branch is not None else 224

  def encode_grouped(self, inputs: list[np.ndarray | None], encode) -> list[jax.Array | None]:
    """Runs `encode(graphdef, state, batch)` (jitted, graphdef static) over the inputs grouped by
    shape, each group padded to a power-of-two batch; None stays None."""
    out: list[jax.Array | None] = [None] * len(inputs)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
      if x is not None:
        groups.setdefault(x.shape, []).append(i)
    for shape, rows in groups.items():
      batch = np.zeros((batch_bucket(len(rows)),) + shape, np.float32)
      batch[:len(rows)] = np.stack([inputs[i] for i in rows])
      encoded = encode(self._graphdef, self._state, jnp.asarray(batch))
      for k, i in enumerate(rows):
        out[i] = encoded[k]
    return out

  # ---- asking -------------------------------------------------------------------------------

  def session(self, video: str | None = None, *, image: str | None = None, audio: str | None = None,
              use_audio: bool = True, media: Media | None = None, system: str | None = None) -> "ChatSession":
    """A multi-turn chat about one input, encoded once."""
    media = media if media is not None else self.encode(video, image=image, audio=audio, use_audio=use_audio)
    return ChatSession(self, media, conv.Conversation.start(self.template, media.mode, media.time_hint, system))

  def ask(self, video: str | None, question: str, *, image: str | None = None, audio: str | None = None,
          use_audio: bool = True, **generation) -> str:
    """One question about one input; `generation` as in `generate`."""
    return self.session(video, image=image, audio=audio, use_audio=use_audio).ask(question, **generation)

  def ask_batch(self, requests: Sequence[Request | tuple[str, str]], **generation) -> list[str]:
    """Answers for many (video, question) pairs or `Request`s, generated as one batch."""
    requests = [r if isinstance(r, Request) else Request(r[1], video=r[0]) for r in requests]
    media = self.encode_many(requests)
    conversations = []
    for r, m in zip(requests, media):
      c = conv.Conversation.start(self.template, m.mode, m.time_hint)
      c.ask(r.question)
      conversations.append(c)
    return self.generate(conversations, media, **generation)

  def generate(self, conversations: Sequence[conv.Conversation], media: Sequence[Media], *,
               sampling: SamplingConfig | None = None, seeds: Sequence[int] | None = None,
               greedy: bool | None = None, on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """The next answer of each conversation, generated as one batch and cleaned as the demo does.

    `on_text(row, text)` receives each row's answer text as it grows (new text only).
    """
    sampling = sampling or self.sampling()
    if greedy is not None:
      sampling = dataclasses.replace(sampling, greedy=greedy)
    prompts = [self._prompt_embeddings(c, m, sampling.max_new_tokens) for c, m in zip(conversations, media)]
    on_step = None if on_text is None else _TextStream(self, len(prompts), on_text)
    out = self.generator(prompts, sampling, seeds, on_step=on_step)
    answers = [self.clean(row) for row in out.rows()]
    if on_step is not None:
      on_step.finish(answers)
    return answers

  def clean(self, generated: Sequence[int]) -> str:
    """The demo's answer text; its ids start with the BOS that transformers 4.28's generate() put
    in front of what it generated."""
    return conv.clean_answer(self.template, [self.tokenizer.bos_id, *generated], self.tokenizer)

  def _prompt_embeddings(self, conversation: conv.Conversation, media: Media, max_new_tokens: int) -> jax.Array:
    rows = layout(self.tokenizer, conversation.prompt(), [e.shape[0] for e in media.embeddings])
    rows = crop_left(rows, self.max_length, max_new_tokens)
    hidden = self.model.config.llama.hidden_size
    modality = (jnp.concatenate(media.embeddings) if media.embeddings else jnp.zeros((1, hidden)))
    return _splice(self.model.llama.embed_tokens[...], jnp.asarray(rows.ids), jnp.asarray(rows.source), modality)


@jax.jit
def _splice(embed_tokens, ids, source, modality):
  """One prompt's embeddings, as `VideoLLaMA.embed` builds them for a batch."""
  spliced = source >= 0
  text = jnp.take(embed_tokens, jnp.where(spliced, 0, ids), axis=0)
  return jnp.where(spliced[:, None], modality[jnp.maximum(source, 0)].astype(text.dtype), text)


class _TextStream:
  """Turns per-step tokens into per-row increments of the cleaned answer text."""

  def __init__(self, chat: VideoChat, rows: int, on_text: Callable[[int, str], None]):
    self.chat, self.on_text = chat, on_text
    self.ids = [[] for _ in range(rows)]
    self.sent = [""] * rows

  def __call__(self, step, tokens, active):
    for row, (token, alive) in enumerate(zip(tokens, active)):
      if not alive:
        continue
      self.ids[row].append(int(token))
      text = self.chat.clean(self.ids[row]).rstrip("\ufffd")  # a partial UTF-8 character: wait for the rest
      if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
        self.on_text(row, text[len(self.sent[row]):])
        self.sent[row] = text

  def finish(self, answers: list[str]) -> None:
    """Sends what was held back (undecodable bytes at the end stay in the final answer)."""
    for row, answer in enumerate(answers):
      if answer.startswith(self.sent[row]) and len(answer) > len(self.sent[row]):
        self.on_text(row, answer[len(self.sent[row]):])
        self.sent[row] = answer


@dataclasses.dataclass
class ChatSession:
  """A conversation about one encoded input."""
  chat: VideoChat
  media: Media
  conversation: conv.Conversation

  def ask(self, question: str, *, on_text: Callable[[str], None] | None = None, seed: int | None = None,
          **generation) -> str:
    """Asks, answers (as `VideoChat.generate`), and records the answer in the history."""
    self.conversation.ask(question)
    stream = None if on_text is None else (lambda row, text: on_text(text))
    seeds = None if seed is None else [seed]
    answer = self.chat.generate([self.conversation], [self.media], seeds=seeds, on_text=stream, **generation)[0]
    self.conversation.record_answer(answer)
    return answer

  @property
  def history(self) -> list[tuple[str, str]]:
    return [tuple(m) for m in self.conversation.messages]
