"""Chat templates: golden prompts read off the reference's conversation_video.py and demo scripts."""

import re

import pytest
import sentencepiece as spm

from vllama_jax import random_checkpoint
from vllama_jax.errors import PromptError
from vllama_jax.text import conversation as cv
from vllama_jax.text.tokenizer import load_tokenizer

VIS = ("You are able to understand the visual content that the user provides. "
       "Follow the instructions carefully and explain your answers in detail.")
HINT = "The video contains 3 frames sampled at 0.0, 1.2, 2.4 seconds. "
AV = ("Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>.                 "
      "Close your ears, open your eyes and you see that <Video><ImageHere></Video>.                  "
      "Now answer my question based on what you have just seen and heard.")
AUDIO = ("Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>. "
         "Now answer my question based on what you have just heard.")
QUESTION = "What is happening?"

GOLDEN = {
    ("vicuna", "image"): VIS + "###Human: <Image><ImageHere></Image>  What is happening?###Assistant:",
    ("vicuna", "video"): VIS + "###Human: <Video><ImageHere></Video> The video contains 3 frames sampled at "
                               "0.0, 1.2, 2.4 seconds.  What is happening?###Assistant:",
    ("vicuna", "audio_video"): "###Human: " + AV + " What is happening?###Assistant:",
    ("vicuna", "audio"): "###Human: " + AUDIO + " What is happening?###Assistant:",
    ("llama_2", "image"): "[INST] <<SYS>>\n" + VIS + "\n<</SYS>>\n\n<Image><ImageHere></Image>  What is happening? [/INST]",
    ("llama_2", "video"): "[INST] <<SYS>>\n" + VIS + "\n<</SYS>>\n\n<Video><ImageHere></Video> The video contains 3 "
                          "frames sampled at 0.0, 1.2, 2.4 seconds.  What is happening? [/INST]",
    ("llama_2", "audio_video"): "[INST] <<SYS>>\n\n<</SYS>>\n\n" + AV + " What is happening? [/INST]",
    ("llama_2", "audio"): "[INST] <<SYS>>\n\n<</SYS>>\n\n" + AUDIO + " What is happening? [/INST]",
}


def test_the_audio_video_message_keeps_the_reference_spaces():
  assert [len(run) for run in re.findall(" {2,}", AV)] == [17, 18]  # guards the golden string itself
  assert cv.media_message("audio_video") == AV
  assert cv.media_message("audio") == AUDIO
  assert cv.media_message("image") == "<Image><ImageHere></Image> "
  assert cv.media_message("video", HINT) == "<Video><ImageHere></Video> " + HINT
  with pytest.raises(PromptError, match="unknown media mode 'gif'"):
    cv.media_message("gif")


def test_time_hint_is_load_videos_message():
  assert cv.time_hint([0, 30, 60], 25.0) == HINT
  assert cv.time_hint([0, 7], 3) == "The video contains 2 frames sampled at 0.0, 2.3 seconds. "


@pytest.mark.parametrize("template,mode", sorted(GOLDEN))
def test_first_turn_prompt(template, mode):
  conv = cv.Conversation.start(cv.TEMPLATES[template], mode, time_hint=HINT if mode == "video" else "")
  conv.ask(QUESTION)
  assert conv.prompt() == GOLDEN[template, mode]
  assert len(conv.messages) == 1  # the question joined the media message
  assert conv.media == {"image": ["image"], "video": ["video"], "audio_video": ["audio", "video"],
                        "audio": ["audio"]}[mode]


def test_two_turns_vicuna():
  conv = cv.Conversation.start(cv.VICUNA, "image")
  conv.ask("Which breed is this dog?")
  conv.record_answer("A beagle.")
  conv.ask("How old is it?")
  assert conv.prompt() == (VIS + "###Human: <Image><ImageHere></Image>  Which breed is this dog?###Assistant: "
                           "A beagle.###Human: How old is it?###Assistant:")


def test_two_turns_llama_2():
  conv = cv.Conversation.start(cv.LLAMA_2_CHAT, "image")
  conv.ask("Which breed is this dog?")
  conv.record_answer("A beagle.")
  conv.ask("How old is it?")
  assert conv.prompt() == ("[INST] <<SYS>>\n" + VIS + "\n<</SYS>>\n\n<Image><ImageHere></Image>  Which breed is "
                           "this dog? [/INST] A beagle. </s><s>[INST] How old is it? [/INST]")


def test_systems_and_text_only_chats():
  conv = cv.Conversation.start(cv.VICUNA, "video", time_hint=HINT, system="")  # demo_audiovideo.py
  conv.ask("Hi")
  assert conv.prompt() == "###Human: <Video><ImageHere></Video> " + HINT + " Hi###Assistant:"
  conv = cv.Conversation.start(cv.LLAMA_2_CHAT)  # no media: the template's own system prompt
  conv.ask("Hi")
  assert conv.prompt() == (
      "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
      "content that the user provides, and assist the user with a variety of tasks using natural language."
      "\n<</SYS>>\n\nHi [/INST]")
  conv = cv.Conversation.start(cv.VICUNA)
  conv.ask("Hi")
  conv.ask("there")  # no media tag in the last message: a new turn, as Chat.ask
  assert conv.prompt() == "###Human: Hi###Human: there###Assistant:"


def test_ask_joins_while_the_media_message_is_last():
  conv = cv.Conversation.start(cv.VICUNA, "audio_video")
  conv.ask("a")
  conv.ask("b")  # still the last user message with </Video>: the reference joins again
  assert conv.messages == [["Human", AV + " a b"]]
  conv = cv.Conversation.start(cv.VICUNA, "audio")
  conv.ask("a")
  assert conv.messages == [["Human", AUDIO + " a"]]


def test_empty_turns_render_as_the_reference():
  msgs = [["Human", "q"], ["Assistant", ""], ["Human", "r"], ["Assistant", None]]
  assert cv.render(cv.VICUNA, "S", msgs) == "S###Human: q###Assistant:Human: r###Assistant:"
  msgs = [["USER", "q"], ["ASSISTANT", ""], ["USER", "r"], ["ASSISTANT", None]]
  assert cv.render(cv.LLAMA_2_CHAT, "S", msgs) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST]<s>[INST] r [/INST]"
  with pytest.raises(PromptError, match="must start with a non-empty user message"):
    cv.render(cv.LLAMA_2_CHAT, "S", [["ASSISTANT", "x"]])


def test_prompt_needs_a_pending_user_message():
  conv = cv.Conversation.start(cv.VICUNA, "image")
  conv.ask("q")
  conv.record_answer("a")
  copy = conv.copy()
  with pytest.raises(PromptError, match="does not end with a user message"):
    conv.prompt()
  copy.ask("r")
  assert len(conv.messages) == 2 and len(copy.messages) == 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tok")
  sp = spm.SentencePieceProcessor(model_file=random_checkpoint.write_tokenizer(str(directory)))
  tokenizer = load_tokenizer(str(directory))
  tokenizer.add_tokens(["<ImageHere>", "<AudioHere>"])
  return tokenizer, sp


def test_stop_sequences(tiny):
  tokenizer, sp = tiny
  assert cv.stop_sequences(cv.VICUNA) == ((835,), (2277, 29937))
  assert cv.stop_sequences(cv.LLAMA_2_CHAT) == ((2,),)
  # The tiny model has "▁###" and "###" pieces: after a space and glued to a word.
  spaced, glued = sp.piece_to_id("▁###"), sp.piece_to_id("###")
  assert sp.id_to_piece(spaced) == "▁###" and sp.id_to_piece(glued) == "###"
  assert cv.stop_sequences(cv.VICUNA, tokenizer) == ((spaced,), (glued,))
  assert sp.encode("Sure.###")[-1] == glued and sp.encode("Sure. ###")[-1] == spaced
  assert cv.stop_sequences(cv.LLAMA_2_CHAT, tokenizer) == ((2,),)


class _FakeLlama:
  """Stands in for the real LLaMA tokenizer: the reference ids spell "###"."""
  special = {"<unk>": 0, "<s>": 1, "</s>": 2}

  def __len__(self):
    return 32000

  def decode(self, ids, skip_special=True):
    return {(835,): "###", (2277, 29937): "###"}.get(tuple(ids), "?")

  def encode(self, text):
    raise AssertionError("the reference ids must be used as they are")


def test_stop_sequences_keep_the_reference_ids_for_llama():
  assert cv.stop_sequences(cv.VICUNA, _FakeLlama()) == ((835,), (2277, 29937))


def test_clean_answer(tiny):
  tokenizer, sp = tiny
  vicuna = lambda text, head=(): cv.clean_answer(cv.VICUNA, list(head) + sp.encode(text), tokenizer)
  assert vicuna("Sure.###Human: x") == "Sure."
  assert vicuna("Sure.###Human: x", head=[0, 1]) == "Sure."
  assert vicuna("Sure.", head=[1, 1]) == "<s>Sure."  # only one leading <s> goes
  assert vicuna("Sure.", head=[1, 0]) == "<unk>Sure."  # <unk> only goes before <s>
  assert vicuna("Assistant: a cat ###") == "a cat"
  assert vicuna(" Human: hi Assistant: yes Assistant: no###x") == "no"
  assert cv.clean_answer(cv.VICUNA, [], tokenizer) == ""
  llama = lambda ids: cv.clean_answer(cv.LLAMA_2_CHAT, ids, tokenizer)
  assert llama(sp.encode("A beagle.") + [2] + sp.encode("ASSISTANT: x")) == "A beagle."
  assert llama(sp.encode("ASSISTANT: a dog") + [2]) == "a dog"
  assert llama(sp.encode("Assistant: a dog###")) == "Assistant: a dog###"  # Vicuna markers are text here
  # transformers 4.28 puts a space before text that ends at a special token.
  assert llama(sp.encode("a") + [0] + sp.encode("b") + [0] + sp.encode("c")) == "a<unk> b<unk>c"
