"""Generated answers during and after training, prompted the way the training data is rendered.

The instruction datasets put the media in front of the first question ("<Video>" + N slots +
"</Video> " + time hint + question; audio+video adds an "<Audio>" run first) inside the training
template, which differs from the demo's first message (spec 7, item 7); asking in the training
style measures what the run learned.
"""

from __future__ import annotations

from flax import nnx

from vllama_jax.text.conversation import TEMPLATES, Conversation


def training_style(chat, media, question: str) -> Conversation:
  """A one-question conversation as `data.text.videochat_turns` renders the first turn."""
  tags = {"audio": ("<Audio>", "</Audio>"), "video": ("<Video>", "</Video>"), "image": ("<Image>", "</Image>")}
  kinds = {"audio_video": ("audio", "video"), "video": ("video",), "image": ("image",), "audio": ("audio",)}
  prefix = " ".join(f"{tags[k][0]}<ImageHere>{tags[k][1]}" for k in kinds[media.mode])
  system = " " if chat.template.name == "llama_2" else ""  # the training templates' empty system
  conversation = Conversation(chat.template, system)
  conversation.messages.append([chat.template.roles[0], f"{prefix} {media.time_hint}{question}"])
  return conversation


def chat_from_state(config, graphdef, params, frozen):
  """A VideoChat over the parameters being trained (nothing is copied or saved)."""
  from vllama_jax.infer.chat import VideoChat
  from vllama_jax.text.tokenizer import Tokenizer
  model = nnx.merge(graphdef, params, frozen)
  return VideoChat(model, Tokenizer(config.init_dir), TEMPLATES[config.template],
                   num_frames=config.data.num_frames)


def first_questions(config, limit: int) -> list[tuple[str, str]]:
  """(media path, first question) of the first held-out records that have a question."""
  from vllama_jax.data.build import records_of
  out = []
  for spec in config.data.datasets:
    for record in records_of(spec, train=False):
      if record.get("broken") or record.get("media_type") != "video":
        continue
      if record["kind"] == "videochat":
        out.append((record["media"], record["qa"][0]["q"]))
      elif record["kind"] == "caption":
        out.append((record["media"], "Describe this video."))
      if len(out) >= limit:
        return out
  return out


def sample_answers(config, graphdef, params, frozen) -> list[str]:
  """A few greedy answers to held-out questions, as log lines."""
  from vllama_jax.infer.chat import Request
  questions = first_questions(config, config.eval.generate)
  if not questions:
    return []
  chat = chat_from_state(config, graphdef, params, frozen)
  media = chat.encode_many([Request(q, video=path, use_audio=config.mode in ("audio", "audio_video"))
                            for path, q in questions])
  conversations = [training_style(chat, m, q) for m, (_, q) in zip(media, questions)]
  answers = chat.generate(conversations, media, sampling=chat.sampling(max_new_tokens=24, greedy=True))
  return [f"  Q: {q}  A: {a}" for (_, q), a in zip(questions, answers)]
