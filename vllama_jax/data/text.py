"""Training text of Video-LLaMA: token ids, modality-slot rows and labels for one sample.

Two paths, as the reference (spec 1.6, 4.1):
- caption path (`caption_example`): BOS + prompt-before + N slots + prompt-after + caption +
  end_sym;
  BOS and the wrapped region are not targets; caption ids equal to the pad id are not targets.
- instruction path (`vicuna_example`, `llama2_example`): the datasets' templates and label masks,
  reproduced with their quirks (each `tokenizer(text)` call = BOS + ids, cut at `max_len`):
  * Vicuna: turn lengths come from tokenising "\\n\\n" and each "###Role: value\\n" separately
    (lengths count ids != pad, i.e. id 0 is not counted); a human turn keeps its first two tokens
    as targets; the speaker test is case-sensitive ("Human" is named by `.lower()`, but only
    "human" is masked); a `from` other than human/gpt renders as "unknown:" and is a target.
  * LLaMA-2: prompt rendered by the demo Conversation (empty messages after the first vanish,
    `lstrip("<s>")` strips characters); rounds split on "</s>"; per round
    `len(tok(head + "[/INST] ")) - 2` tokens masked from `cur`, `cur += len(tok(round))` (the
    extra BOS of every later round shifts the mask by one per round); everything after the
    last round is masked; a round without exactly one "[/INST] " stops the loop.
Placeholder ids (`<ImageHere>`) become id 0 and get `source` = their row among the modality
rows; everything else has source -1.
"""

from __future__ import annotations

import re

import numpy as np

IGNORE = -100
PLACEHOLDER = "<ImageHere>"


class BrokenSample(ValueError):
  """A sample the pipeline skips; `reason` is the counter it is filed under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def blip_caption(caption: str, max_words: int = 50) -> str:
  """LAVIS `blip_caption`: lower-case, [.!"()*#:;~] -> space, collapse spaces, strip, cut words."""
  caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
  caption = re.sub(r"\s{2,}", " ", caption)
  caption = caption.rstrip("\n").strip(" ")
  words = caption.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else caption


def _tok(tokenizer, text: str, max_len: int | None = None) -> list[int]:
  """`tokenizer(text, max_length=max_len, truncation=True).input_ids`: BOS added, cut right
  (`tokenizer(text).input_ids` without max_len)."""
  return ([tokenizer.bos_id] + tokenizer.encode(text))[:max_len]


def assign_slots(ids, placeholder_id: int, runs) -> tuple[np.ndarray, np.ndarray]:
  """(ids with placeholders -> 0, source rows). The placeholders must form len(runs) consecutive
  runs of the given lengths (the reference's forward raises otherwise)."""
  ids = np.asarray(ids, np.int32)
  where = np.flatnonzero(ids == placeholder_id)
  if len(where) != sum(runs):
    raise BrokenSample("placeholders", f"{len(where)} <ImageHere> tokens, expected {sum(runs)}")
  source = np.full(ids.shape, -1, np.int32)
  row = 0
  for n in runs:
    span = where[row:row + n]
    if span[-1] - span[0] != n - 1:
      raise BrokenSample("placeholders", "the <ImageHere> tokens are not consecutive runs")
    source[span] = np.arange(row, row + n)
    row += n
  out = ids.copy()
  out[where] = 0
  return out, source


def caption_example(tokenizer, caption: str, runs=(32,), prompt: str | None = None,
                    end_sym: str = "\n", max_txt_len: int = 32) -> dict:
  """The caption path: `prompt` (if any) holds one `<ImageHere>`, where all slot runs go."""
  before, after = prompt.split(PLACEHOLDER) if prompt else ("", "")
  before_ids = tokenizer.encode(before) if before else []
  after_ids = tokenizer.encode(after) if after else []
  text_ids = tokenizer.encode(caption + end_sym)[:max_txt_len]
  n = sum(runs)
  ids = [tokenizer.bos_id] + before_ids + [0] * n + after_ids + text_ids
  source = np.full(len(ids), -1, np.int32)
  start = 1 + len(before_ids)
  source[start:start + n] = np.arange(n)
  labels = np.full(len(ids), IGNORE, np.int32)
  text = np.asarray(text_ids, np.int32)
  labels[len(ids) - len(text_ids):] = np.where(text == tokenizer.pad_id, IGNORE, text)
  return {"ids": np.asarray(ids, np.int32), "source": source, "labels": labels}


def _finish(tokenizer, ids, labels, runs, full_len, max_len) -> dict:
  placeholder = tokenizer.added[PLACEHOLDER]
  if np.any(labels == placeholder):  # the reference's loss would index past the vocabulary
    raise BrokenSample("placeholders", "an <ImageHere> token is a target")
  try:
    ids, source = assign_slots(ids, placeholder, runs)
  except BrokenSample:
    if full_len > max_len:
      raise BrokenSample("too long", f"{full_len} tokens cut at {max_len} split the placeholders")
    raise
  return {"ids": ids, "source": source, "labels": np.asarray(labels, np.int32)}


VICUNA_HEADER = "\n\n"  # the instruction datasets' empty system message and its separator


def vicuna_turn_texts(turns) -> list[str]:
  """Each turn as the instruction datasets render it: "###Human: ...\\n" / "###Assistant: ...\\n"."""
  roles = {"human": "Human", "gpt": "Assistant"}
  return [f"###{roles.get(t['from'].lower(), 'unknown')}: {t['value']}\n" for t in turns]


def vicuna_prompt(turns) -> str:
  """The Vicuna training text: header, the turns, and a closing "###"."""
  return VICUNA_HEADER + "".join(vicuna_turn_texts(turns)) + "###"


def vicuna_example(tokenizer, turns, runs=(32,), max_len: int = 512) -> dict:
  """`preprocess` + `_mask_targets` of the instruction datasets. turns: [{"from", "value"}]."""
  header, pieces = VICUNA_HEADER, vicuna_turn_texts(turns)
  text = vicuna_prompt(turns)
  full = [tokenizer.bos_id] + tokenizer.encode(text)
  ids = full[:max_len]
  labels = np.asarray(ids, np.int64)
  lens = [int(np.count_nonzero(np.asarray(_tok(tokenizer, p, max_len)) != tokenizer.pad_id))
          for p in [header] + pieces]
  cur = lens[0]
  labels[:cur] = IGNORE
  for n, turn in zip(lens[1:], turns):
    if turn["from"] == "human":
      labels[cur + 2:cur + n] = IGNORE
    cur += n
  return _finish(tokenizer, ids, labels, runs, len(full), max_len)


def llama2_prompt(turns, system: str = " ") -> str:
  """The LLaMA-2 training prompt, as the reference's Conversation.get_prompt renders it."""
  roles = {"human": "USER", "gpt": "ASSISTANT"}
  try:
    if roles[turns[0]["from"]] != "USER":
      turns = turns[1:]
    for j, t in enumerate(turns):
      if roles[t["from"]] != ("USER", "ASSISTANT")[j % 2]:
        raise BrokenSample("bad conversation", "turns do not alternate human/gpt")
  except (KeyError, IndexError):
    raise BrokenSample("bad conversation", "a turn is not from human or gpt") from None
  if not turns or not turns[0]["value"]:
    raise BrokenSample("bad conversation", "the first message is empty")
  out = ""
  for i, t in enumerate(turns):
    message = t["value"]
    if not message:
      continue
    if i == 0:
      message = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + message
    out += f"<s>[INST] {message} [/INST]" if i % 2 == 0 else f" {message} </s>"
  return out.lstrip("<s>")


def llama2_example(tokenizer, turns, runs=(32,), max_len: int = 512) -> dict:
  """`preprocess_for_llama_v2` of the instruction datasets."""
  text = llama2_prompt(turns)
  full = [tokenizer.bos_id] + tokenizer.encode(text)
  ids = full[:max_len]
  labels = np.asarray(ids, np.int64)
  sep = "[/INST] "
  cur = 1
  labels[:cur] = IGNORE
  for rnd in text.split("</s>"):
    if rnd == "":
      break
    parts = rnd.split(sep)
    if len(parts) != 2:
      break
    # Untruncated lengths, as the reference's: a round longer than max_len stays masked to the cut.
    instruction = len(_tok(tokenizer, parts[0] + sep)) - 2
    labels[cur:cur + max(instruction, 0)] = IGNORE
    cur += len(_tok(tokenizer, rnd))
  labels[cur:] = IGNORE
  return _finish(tokenizer, ids, labels, runs, len(full), max_len)


def slot_string(runs, open_tags=("<Video>",), close_tags=("</Video>",)) -> str:
  """The placeholder text of the modality runs, e.g. "<Video>" + 32 x <ImageHere> + "</Video>"."""
  return " ".join(o + PLACEHOLDER * n + c for n, o, c in zip(runs, open_tags, close_tags))


def llava_turns(conversations, runs=(32,)) -> list[dict]:
  """LLaVA: every "<image>" -> "<Image>" + N x <ImageHere> + "</Image>" (all turns)."""
  image = "<Image>" + PLACEHOLDER * sum(runs) + "</Image>"
  return [{"from": t["from"], "value": t["value"].replace("<image>", image)} for t in conversations]


TAGS = {"audio": ("<Audio>", "</Audio>"), "video": ("<Video>", "</Video>"), "image": ("<Image>", "</Image>")}


def videochat_turns(qa, hint: str, runs=(32,), kinds=None) -> list[dict]:
  """VideoChat: the first q gets "<Video>" + N x <ImageHere> + "</Video> " + time hint. `kinds`
  names each run's modality (default: video, or audio then video for two runs); with audio and
  video, runs (8, 32), the prefix is "<Audio>..</Audio> <Video>..</Video> " (not in the reference,
  which never trained audio and video jointly)."""
  kinds = kinds or (("audio", "video") if len(runs) == 2 else ("video",))
  prefix = slot_string(runs, [TAGS[k][0] for k in kinds], [TAGS[k][1] for k in kinds])
  turns = []
  for i, t in enumerate(qa):
    q = (prefix + " " + hint + t["q"]) if i == 0 else t["q"]
    turns += [{"from": "human", "value": q}, {"from": "gpt", "value": t["a"]}]
  return turns


def instruction_example(tokenizer, turns, template: str = "vicuna", runs=(32,),
                        max_len: int = 512) -> dict:
  if template == "vicuna":
    return vicuna_example(tokenizer, turns, runs, max_len)
  if template == "llama_v2":
    return llama2_example(tokenizer, turns, runs, max_len)
  raise ValueError(f"unknown template {template!r}; expected 'vicuna' or 'llama_v2'")
