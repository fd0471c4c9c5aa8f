"""The tokenizer path: a SentencePiece model made here loads exactly as a released LLaMA one does."""

import json

import pytest
import sentencepiece as spm

from convert_weights import main as convert_main
from vllama_jax import random_checkpoint
from vllama_jax.config import LLAMA_PRESETS
from vllama_jax.errors import CheckpointError
from vllama_jax.text.tokenizer import load_tokenizer

TEXTS = ["###Human: What is happening in this video? ###Assistant:", "a cat playing the piano 2023",
         " leading space and  double space", "ünïcödé ✓ falls back to bytes", "[INST] <<SYS>>\n \n<</SYS>>"]


@pytest.mark.parametrize("with_config", [True, False])
def test_ids_match_sentencepiece(tmp_path, with_config):
  model_file = random_checkpoint.write_tokenizer(str(tmp_path), with_config=with_config)
  reference = spm.SentencePieceProcessor(model_file=model_file)
  tokenizer = load_tokenizer(str(tmp_path))
  for text in TEXTS:
    assert tokenizer.encode(text) == reference.encode(text), text
    assert tokenizer.decode(tokenizer.encode(text)) == reference.decode(reference.encode(text))
  assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 0)
  assert len(tokenizer) == reference.get_piece_size()


def test_added_and_special_tokens_split_the_text_as_the_slow_tokenizer(tmp_path):
  model_file = random_checkpoint.write_tokenizer(str(tmp_path))
  (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 384}))  # Vicuna v0's extra row
  sp = spm.SentencePieceProcessor(model_file=model_file)
  tokenizer = load_tokenizer(str(tmp_path))
  assert len(tokenizer) == 385
  image, audio = tokenizer.add_tokens(["<ImageHere>", "<AudioHere>"])
  assert (image, audio) == (385, 386) and len(tokenizer) == 387
  # Added tokens strip the spaces beside them; each chunk gets its own SentencePiece dummy prefix.
  assert tokenizer.encode("<Video><ImageHere></Video> Describe") == \
      sp.encode("<Video>") + [image] + sp.encode("</Video> Describe")
  assert tokenizer.encode("a  <ImageHere>  b[PAD]") == sp.encode("a") + [image] + sp.encode("b") + [384]
  # Special tokens written as text become ids and keep the surrounding spaces.
  assert tokenizer.encode("hi </s><s>[INST] go") == sp.encode("hi ") + [2, 1] + sp.encode("[INST] go")
  assert tokenizer.decode([1] + sp.encode("a cat") + [image, 2]) == "a cat"
  assert tokenizer.decode(sp.encode("a") + [image], skip_special=False) == "a<ImageHere>"


def test_converter_carries_the_tokenizer(tmp_path):
  src = str(tmp_path / "hf")
  random_checkpoint.write_hf_llama(src, LLAMA_PRESETS["tiny"].replace(vocab_size=384))
  model_file = random_checkpoint.write_tokenizer(src)
  assert convert_main(["--llama", src, "--out", str(tmp_path / "out")]) == 0
  converted = load_tokenizer(str(tmp_path / "out"))
  reference = spm.SentencePieceProcessor(model_file=model_file)
  for text in TEXTS:
    assert converted.encode(text) == reference.encode(text)


def test_tokenizer_json_only_directories_load_through_tokenizers(tmp_path):
  from transformers import LlamaTokenizer
  random_checkpoint.write_tokenizer(str(tmp_path / "sp"))
  LlamaTokenizer.from_pretrained(str(tmp_path / "sp")).save_pretrained(str(tmp_path / "json"))
  (tmp_path / "json" / "tokenizer.model").unlink(missing_ok=True)
  tokenizer = load_tokenizer(str(tmp_path / "json"))
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp" / "tokenizer.model"))
  assert tokenizer.encode("a cat playing the piano") == sp.encode("a cat playing the piano")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="no tokenizer found; expected tokenizer.model"):
    load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
  with pytest.raises(CheckpointError, match="the tokenizer cannot be loaded"):
    load_tokenizer(str(tmp_path))
