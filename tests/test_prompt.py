"""Prompt layout: the ids and modality rows Chat.get_context_emb would have concatenated."""

import numpy as np
import pytest
import sentencepiece as spm

from vllama_jax import random_checkpoint
from vllama_jax.errors import PromptError
from vllama_jax.text.prompt import PromptLayout, crop_left, layout
from vllama_jax.text.tokenizer import load_tokenizer

AV_PROMPT = ("###Human: Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>."
             "                 Close your ears, open your eyes and you see that <Video><ImageHere></Video>."
             "                  Now answer my question based on what you have just seen and heard. Why?###Assistant:")
LLAMA_PROMPT = ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<Image><ImageHere></Image>  Which breed? [/INST] A beagle. "
                "</s><s>[INST] How old is it? [/INST]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tok")
  sp = spm.SentencePieceProcessor(model_file=random_checkpoint.write_tokenizer(str(directory)))
  tokenizer = load_tokenizer(str(directory))
  tokenizer.add_tokens(["<ImageHere>", "<AudioHere>"])  # as the reference; the split never needs them
  return tokenizer, sp


def test_audio_video_layout(tiny):
  tokenizer, sp = tiny
  segs = [sp.encode("###Human: Close your eyes, open your ears and you imagine only based on the sound that: "),
          sp.encode(".                 Close your ears, open your eyes and you see that <Video>"),
          sp.encode("</Video>.                  Now answer my question based on what you have just seen and heard."
                    " Why?###Assistant:")]
  out = layout(tokenizer, AV_PROMPT, [8, 32])
  assert out.ids.dtype == np.int32 and out.source.dtype == np.int32
  assert out.ids.tolist() == [1] + segs[0] + [0] * 8 + segs[1] + [0] * 32 + segs[2]
  assert out.source.tolist() == ([-1] * (1 + len(segs[0])) + list(range(8)) + [-1] * len(segs[1])
                                 + list(range(8, 40)) + [-1] * len(segs[2]))
  # Tokenising the whole prompt would strip the spaces beside <ImageHere>; the reference does not.
  assert segs[0][-1] == sp.piece_to_id("▁")


def test_llama_2_layout_keeps_special_tokens_in_a_segment(tiny):
  tokenizer, sp = tiny
  out = layout(tokenizer, LLAMA_PROMPT, [32])
  assert out.ids.tolist() == ([1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<Image>") + [0] * 32
                              + sp.encode("</Image>  Which breed? [/INST] A beagle. ") + [2, 1]
                              + sp.encode("[INST] How old is it? [/INST]"))
  assert (out.source >= 0).sum() == 32 and out.source.max() == 31


def test_edge_segments(tiny):
  tokenizer, sp = tiny
  out = layout(tokenizer, "<ImageHere><ImageHere>", [2, 3])  # empty segments: BOS only
  assert out.ids.tolist() == [1, 0, 0, 0, 0, 0] and out.source.tolist() == [-1, 0, 1, 2, 3, 4]
  out = layout(tokenizer, "no media", [])
  assert out.ids.tolist() == [1] + sp.encode("no media") and (out.source == -1).all()


def test_placeholder_count_must_match(tiny):
  tokenizer, _ = tiny
  with pytest.raises(PromptError, match="has 2 <ImageHere> placeholders but 1 modality inputs"):
    layout(tokenizer, AV_PROMPT, [8])
  with pytest.raises(ValueError, match="has 0 <ImageHere> placeholders but 1"):
    layout(tokenizer, "text", [32])
  with pytest.raises(PromptError, match="modality lengths must be >= 1"):
    layout(tokenizer, AV_PROMPT, [8, 0])


def _reference_embeddings(tokenizer, prompt, table, modalities):
  """Chat.get_context_emb: per-segment embeddings, modality embeddings between them, concatenated."""
  segs = prompt.split("<ImageHere>")
  embs = [table[([1] if i == 0 else []) + tokenizer.encode(s)] for i, s in enumerate(segs)]
  mixed = [e for pair in zip(embs[:-1], modalities) for e in pair] + [embs[-1]]
  return np.concatenate(mixed, axis=0)


@pytest.mark.parametrize("prompt,lengths", [(AV_PROMPT, [8, 32]), (LLAMA_PROMPT, [32]), ("x", [])])
def test_gather_reproduces_the_concatenation(tiny, prompt, lengths):
  tokenizer, _ = tiny
  rng = np.random.default_rng(0)
  table = rng.normal(size=(len(tokenizer), 16)).astype(np.float32)
  modalities = [rng.normal(size=(n, 16)).astype(np.float32) for n in lengths]
  rows = np.concatenate(modalities + [np.full((1, 16), np.nan, np.float32)], axis=0)  # NaN pad row: must not reach the output
  out = layout(tokenizer, prompt, lengths)
  gathered = np.where(out.source[:, None] >= 0, rows[np.maximum(out.source, 0)], table[out.ids])
  np.testing.assert_array_equal(gathered, _reference_embeddings(tokenizer, prompt, table, modalities))


def test_crop_left():
  lay = PromptLayout(np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32) - 3)
  same = crop_left(lay, max_length=310, max_new_tokens=300)  # 10 + 300 <= 310: untouched
  assert same.ids.tolist() == list(range(10))
  cut = crop_left(lay, max_length=305, max_new_tokens=300)  # begin = 10 + 300 - 305 = 5
  assert cut.ids.tolist() == [5, 6, 7, 8, 9] and cut.source.tolist() == [2, 3, 4, 5, 6]
  assert crop_left(lay, 4).ids.tolist() == [6, 7, 8, 9]
  assert len(crop_left(lay).ids) == 10  # the demo's 2000
  with pytest.raises(PromptError, match="leaves no room"):
    crop_left(lay, max_length=300, max_new_tokens=300)
