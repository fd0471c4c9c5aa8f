"""Training text and label masks against id sequences built from SentencePiece directly,
following the reference datasets' code (llava/video_instruct_dataset.py, video_llama.forward)."""

import numpy as np
import pytest
import sentencepiece as spm

from vllama_jax.data import text as T
from vllama_jax.random_checkpoint import write_tokenizer
from vllama_jax.text.tokenizer import Tokenizer

N = 4  # query tokens per sample in these tests (32 in the release)
PH = "<ImageHere>"
CONV = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  write_tokenizer(d)
  tok = Tokenizer(d)
  tok.add_tokens([PH])
  sp = spm.SentencePieceProcessor(model_file=f"{d}/tokenizer.model")
  return tok, sp, tok.added[PH]


def test_blip_caption():
  assert T.blip_caption('A "Dog" runs!!  (fast);\n') == "a dog runs fast"
  assert T.blip_caption("x.y:z~w#q") == "x y z w q"
  assert T.blip_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_caption_path(tk):
  tok, sp, _ = tk
  prompt = "###Human: <Image><ImageHere></Image> Describe it. ###Assistant: "
  ex = T.caption_example(tok, "a dog runs far away", (N,), prompt, "###", max_txt_len=5)
  before, after = sp.encode("###Human: <Image>"), sp.encode("</Image> Describe it. ###Assistant: ")
  caption = sp.encode("a dog runs far away###")[:5]  # right truncation, end_sym included
  assert ex["ids"].tolist() == [1] + before + [0] * N + after + caption
  start = 1 + len(before)
  assert ex["source"].tolist() == [-1] * start + list(range(N)) + [-1] * (len(after) + 5)
  assert ex["labels"].tolist() == [-100] * (len(ex["ids"]) - 5) + caption


def test_caption_path_stage1(tk):
  tok, sp, _ = tk
  ex = T.caption_example(tok, "a dog", (8, N))  # no prompt; joint audio+video rows
  cap = sp.encode("a dog\n")
  assert ex["ids"].tolist() == [1] + [0] * (8 + N) + cap
  assert ex["source"].tolist() == [-1] + list(range(8 + N)) + [-1] * len(cap)
  assert ex["labels"].tolist() == [-100] * (1 + 8 + N) + cap


def _vicuna_expected(sp, turns, ph_id):
  """preprocess + _mask_targets, written out with SentencePiece chunks (the slow tokenizer strips
  whitespace beside the added <ImageHere> and runs SentencePiece on each chunk)."""
  def tok(s):  # tokenizer(s).input_ids
    ids = [1]
    for i, chunk in enumerate(s.split(PH)):
      if i:
        ids.append(ph_id)
      if chunk:
        ids += sp.encode(chunk)
    return ids
  pieces = [f"###{'Human' if t['from'].lower() == 'human' else 'Assistant'}: {t['value']}\n"
            for t in turns]
  ids = tok("\n\n" + "".join(pieces) + "###")
  labels = list(ids)
  cur = len(tok("\n\n"))
  labels[:cur] = [-100] * cur
  for piece, t in zip(pieces, turns):
    n = len(tok(piece))
    if t["from"] == "human":
      labels[cur + 2:cur + n] = [-100] * len(labels[cur + 2:cur + n])
    cur += n
  return ids, labels


def test_vicuna_llava(tk):
  tok, sp, ph = tk
  turns = T.llava_turns(CONV, (N,))
  assert turns[0]["value"] == "What is this?\n<Image>" + PH * N + "</Image>"
  ex = T.vicuna_example(tok, turns, (N,))
  ids, labels = _vicuna_expected(sp, turns, ph)
  assert ex["labels"].tolist() == labels
  start = ids.index(ph)
  assert ex["ids"].tolist() == [0 if i == ph else i for i in ids]
  assert ex["source"][start:start + N].tolist() == list(range(N))
  assert (ex["source"] >= 0).sum() == N
  # header (BOS + "\n\n") masked; the first human turn keeps two tokens as targets
  head = len(sp.encode("\n\n")) + 1
  assert (ex["labels"][:head] == -100).all() and (ex["labels"][head:head + 2] != -100).all()


def test_vicuna_videochat_and_case_quirk(tk):
  tok, sp, ph = tk
  qa = [{"q": "What happens?", "a": "A dog runs."}]
  hint = "The video contains 8 frames sampled at 0.0, 1.0 seconds. "
  turns = T.videochat_turns(qa, hint, (N,))
  assert turns == [{"from": "human", "value": "<Video>" + PH * N + "</Video> " + hint + "What happens?"},
                   {"from": "gpt", "value": "A dog runs."}]
  ex = T.vicuna_example(tok, turns, (N,))
  assert ex["labels"].tolist() == _vicuna_expected(sp, turns, ph)[1]
  # "Human" renders as a human turn but is not masked (case-sensitive speaker test)
  upper = turns + [{"from": "Human", "value": "More?"}, {"from": "gpt", "value": "No."}]
  ex = T.vicuna_example(tok, upper, (N,))
  expected = _vicuna_expected(sp, upper, ph)[1]
  assert ex["labels"].tolist() == expected
  tail = sp.encode("###Human: More?\n###Assistant: No.\n###")
  assert (np.asarray(expected[-len(tail):]) != -100).all()
  # ... so a placeholder run in such a turn would be a target: broken (the reference would crash)
  with pytest.raises(T.BrokenSample):
    T.vicuna_example(tok, [dict(turns[0], **{"from": "Human"}), turns[1]], (N,))


def test_llama2_llava(tk):
  tok, sp, ph = tk
  turns = T.llava_turns(CONV, (N,))
  prompt = T.llama2_prompt(turns)
  q1 = "What is this?\n<Image>" + PH * N + "</Image>"
  assert prompt == (f"[INST] <<SYS>>\n \n<</SYS>>\n\n{q1} [/INST] A cat. </s>"
                    "<s>[INST] Sure? [/INST] Yes. </s>")
  ex = T.llama2_example(tok, turns, (N,))
  # ids: BOS, chunks between <ImageHere> (whitespace beside it stripped), </s>/<s> as ids 1/2
  head = sp.encode("[INST] <<SYS>>\n \n<</SYS>>\n\nWhat is this?\n<Image>")
  rest = sp.encode("</Image> [/INST] A cat. ")
  r1 = sp.encode("[INST] Sure? [/INST] Yes. ")
  ids = [1] + head + [ph] * N + rest + [2] + [1] + r1 + [2]
  assert ex["ids"].tolist() == [0 if i == ph else i for i in ids]
  # masks: round 0 instruction = len(tok("...[/INST] ")) - 2 tokens from 1; cur += len(tok(round))
  instr0 = 1 + len(head) + N + len(sp.encode("</Image> [/INST] ")) - 2
  round0 = 1 + len(head) + N + len(rest)
  cur = 1 + round0
  instr1 = 2 + len(sp.encode("[INST] Sure? [/INST] ")) - 2
  round1 = 2 + len(r1)
  labels = list(ids)
  labels[:1 + instr0] = [-100] * (1 + instr0)
  labels[cur:cur + instr1] = [-100] * instr1
  labels[cur + round1:] = [-100] * len(labels[cur + round1:])
  assert ex["labels"].tolist() == labels


def test_llama2_bad_roles(tk):
  tok, _, _ = tk
  with pytest.raises(T.BrokenSample):
    T.llama2_example(tok, [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], (N,))
  with pytest.raises(T.BrokenSample):
    T.llama2_example(tok, [{"from": "bot", "value": "a"}], (N,))


def test_truncation(tk):
  tok, _, _ = tk
  long_q = "word " * 80
  # placeholders after the cut: broken ("too long")
  turns = T.llava_turns([{"from": "human", "value": long_q + "<image>"}, {"from": "gpt", "value": "x"}], (N,))
  for template in ("vicuna", "llama_v2"):
    with pytest.raises(T.BrokenSample) as e:
      T.instruction_example(tok, turns, template, (N,), max_len=64)
    assert e.value.reason == "too long"
  # placeholders before the cut: kept, truncated to max_len as the reference does
  turns = T.llava_turns([{"from": "human", "value": "<image>" + long_q}, {"from": "gpt", "value": "x"}], (N,))
  ex = T.instruction_example(tok, turns, "vicuna", (N,), max_len=64)
  assert len(ex["ids"]) == 64 and (ex["source"] >= 0).sum() == N
  # LLaMA-2: the instruction's length is counted before the cut, so all of the kept text is masked
  ex = T.instruction_example(tok, turns, "llama_v2", (N,), max_len=64)
  assert len(ex["ids"]) == 64 and (ex["labels"] == -100).all()


def test_placeholder_count(tk):
  tok, _, _ = tk
  turns = T.llava_turns([{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}], (N,))
  with pytest.raises(T.BrokenSample) as e:
    T.vicuna_example(tok, turns, (N,))
  assert e.value.reason == "placeholders"
  turns = T.llava_turns([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}], (N,))
  with pytest.raises(T.BrokenSample):  # a second image (here in the answer, a target)
    T.vicuna_example(tok, turns, (N,))
