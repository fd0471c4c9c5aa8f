"""Chat templates and multi-turn history, rendered exactly as the reference demo's `Conversation`.

Two templates: Vicuna v0 (`default_conversation`, "###" separators) and LLaMA-2 chat
(`conv_llava_llama_2`, [INST] blocks). The demo opens every chat with one user message holding the
media placeholders; questions are then joined onto it (`Chat.ask`) until the first answer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from vllama_jax.errors import PromptError

SINGLE, LLAMA_2 = "single", "llama_2"

# demo_video.py / demo_audiovideo.py set this system prompt for images and (demo_video.py) videos.
VISUAL_SYSTEM = ("You are able to understand the visual content that the user provides. "
                 "Follow the instructions carefully and explain your answers in detail.")


@dataclasses.dataclass(frozen=True)
class Template:
  """A separator style with its roles and the reference's stop ids (real LLaMA tokenizer)."""
  name: str
  style: str  # SINGLE or LLAMA_2
  system: str
  roles: tuple[str, str]
  sep: str
  sep2: str | None
  stop_text: str  # what the stop ids spell; generation is cut there
  stop_ids: tuple[tuple[int, ...], ...]


VICUNA = Template("vicuna", SINGLE, "", ("Human", "Assistant"), "###", None, "###",
                  ((835,), (2277, 29937)))  # "▁###" and "##"+"#"
LLAMA_2_CHAT = Template(
    "llama_2", LLAMA_2,
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    ("USER", "ASSISTANT"), "<s>", "</s>", "</s>", ((2,),))
TEMPLATES = {"vicuna": VICUNA, "llama_2": LLAMA_2_CHAT}

# The reference's audio+video message: a backslash continuation inside the string literal leaves
# the next line's 16-space indent in the text, hence 17 and 18 spaces.
AUDIO_VIDEO_MESSAGE = (
    "Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>."
    + " " * 17 + "Close your ears, open your eyes and you see that <Video><ImageHere></Video>."
    + " " * 18 + "Now answer my question based on what you have just seen and heard.")
# Ours: the reference has no audio-only chat. The audio sentence of the message above, single-spaced.
AUDIO_MESSAGE = ("Close your eyes, open your ears and you imagine only based on the sound that: "
                 "<ImageHere>. Now answer my question based on what you have just heard.")

MODES = ("image", "video", "audio_video", "audio")
# Which embeddings fill the placeholders of each mode's message, in placeholder order.
PLACEHOLDERS = {"image": ("image",), "video": ("video",), "audio_video": ("audio", "video"),
                "audio": ("audio",)}
# System prompt per mode. demo_audiovideo.py uses "" for video without audio too.
SYSTEMS = {"image": VISUAL_SYSTEM, "video": VISUAL_SYSTEM, "audio_video": "", "audio": ""}


def time_hint(frame_indices: Sequence[int], fps: float) -> str:
  """`load_video`'s message on the sampled frames, trailing space included."""
  seconds = ", ".join(str(round(int(i) / float(fps), 1)) for i in frame_indices)
  return f"The video contains {len(frame_indices)} frames sampled at {seconds} seconds. "


def media_message(mode: str, time_hint: str = "") -> str:
  """The first user message of a chat about one image, video, video with audio, or audio clip."""
  if mode == "image":
    return "<Image><ImageHere></Image> "
  if mode == "video":
    return "<Video><ImageHere></Video> " + time_hint
  if mode == "audio_video":
    return AUDIO_VIDEO_MESSAGE
  if mode == "audio":
    return AUDIO_MESSAGE
  raise PromptError(f"unknown media mode {mode!r}; expected one of {MODES}")


def render(template: Template, system: str, messages: Sequence[Sequence]) -> str:
  """`Conversation.get_prompt`: messages are [role, text or None]; None/"" renders as a pending turn."""
  if template.style == SINGLE:
    out = system + template.sep
    for role, message in messages:
      out += f"{role}: {message}{template.sep}" if message else f"{role}:"
    return out
  if not messages or not messages[0][1] or messages[0][0] != template.roles[0]:
    raise PromptError("a LLaMA-2 conversation must start with a non-empty user message")
  out = ""
  for i, (_, message) in enumerate(messages):
    if not message:
      continue
    if i == 0:
      message = f"<<SYS>>\n{system}\n<</SYS>>\n\n{message}"
    out += f"{template.sep}[INST] {message} [/INST]" if i % 2 == 0 else f" {message} {template.sep2}"
  return out.lstrip(template.sep)  # a character-set strip, as the reference; takes off the first "<s>"


@dataclasses.dataclass
class Conversation:
  """A chat history. `media` lists the embeddings its placeholders take, in order."""
  template: Template
  system: str
  messages: list[list] = dataclasses.field(default_factory=list)
  media: list[str] = dataclasses.field(default_factory=list)

  @classmethod
  def start(cls, template: Template, mode: str | None = None, time_hint: str = "",
            system: str | None = None) -> Conversation:
    """A new chat as the demo opens it: the mode's system prompt (unless given) and media message."""
    if system is None:
      system = template.system if mode is None else SYSTEMS.get(mode, "")
    conv = cls(template, system)
    if mode is not None:
      conv.add_media(mode, time_hint)
    return conv

  def add_media(self, mode: str, time_hint: str = ""):
    self.messages.append([self.template.roles[0], media_message(mode, time_hint)])
    self.media.extend(PLACEHOLDERS[mode])

  def ask(self, text: str):
    """`Chat.ask`: a question right after the media message joins it with a space."""
    last = self.messages[-1] if self.messages else None
    # The reference tests for </Video> or </Image>; <ImageHere> also catches our audio-only message.
    if last and last[0] == self.template.roles[0] and any(
        tag in last[1] for tag in ("</Video>", "</Image>", "<ImageHere>")):
      last[1] = " ".join([last[1], text])
    else:
      self.messages.append([self.template.roles[0], text])

  def record_answer(self, text: str):
    self.messages.append([self.template.roles[1], text])

  def prompt(self) -> str:
    """The text to generate the next answer from (an empty assistant turn appended)."""
    if not self.messages or self.messages[-1][0] != self.template.roles[0]:
      raise PromptError("nothing to answer: the conversation does not end with a user message")
    return render(self.template, self.system, self.messages + [[self.template.roles[1], None]])

  def copy(self) -> Conversation:
    return Conversation(self.template, self.system, [list(m) for m in self.messages], list(self.media))


def stop_sequences(template: Template, tokenizer=None) -> tuple[tuple[int, ...], ...]:
  """Token sequences that end generation.

  The reference hard-codes LLaMA ids; they are returned when no tokenizer is given or when they
  spell `stop_text` in it. Other (e.g. tiny test) tokenizers get the two forms the text takes:
  after a space (SentencePiece's "▁" prefix) and glued to the previous character.
  """
  if tokenizer is None or _spells(tokenizer, template.stop_ids, template.stop_text):
    return template.stop_ids
  spaced = tuple(tokenizer.encode(template.stop_text))
  # "\n" is a byte piece that merges with nothing, so what follows it is the glued form.
  head, glued = tokenizer.encode("\n"), tokenizer.encode("\n" + template.stop_text)
  forms = [spaced]
  if glued[:len(head)] == head and len(glued) > len(head):
    forms.append(tuple(glued[len(head):]))
  return tuple(dict.fromkeys(forms))


def _spells(tokenizer, sequences, text: str) -> bool:
  return all(max(s) < len(tokenizer) and tokenizer.decode(list(s), skip_special=False) == text
             for s in sequences)


def clean_answer(template: Template, ids: Sequence[int], tokenizer) -> str:
  """`Chat.answer`'s post-processing of generated ids into the answer text."""
  ids = [int(i) for i in ids]
  if ids and ids[0] == 0:  # a leading <unk>
    ids = ids[1:]
  if ids and ids[0] == 1:  # a leading <s>
    ids = ids[1:]
  text = _decode_keeping_specials(tokenizer, ids)
  cut = template.sep if template.style == SINGLE else template.sep2
  return text.split(cut)[0].split(template.roles[1] + ":")[-1].strip()


def _decode_keeping_specials(tokenizer, ids: list[int]) -> str:
  """transformers 4.28's slow LLaMA decode without skipping: "<unk>", "<s>", "</s>" stay in the
  text, and a space is put before each run of text that ends at one (except at the start)."""
  names = {i: t for t, i in tokenizer.special.items()}
  out, run, prev_special = "", [], False
  for k, i in enumerate(ids):
    if i in names:
      out += ("" if prev_special or k == 0 else " ") + tokenizer.decode(run, skip_special=False) + names[i]
      run, prev_special = [], True
    else:
      run.append(i)
      prev_special = False
  return out + tokenizer.decode(run, skip_special=False)
