"""The chat layer on a tiny random Video-LLaMA: modes, batching, streaming, sessions and the CLI.
(Numerical parity of the model itself is in test_video_llama_e2e.py.)"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from media_fixtures import tone_mix, write_media  # noqa: E402

from vllama_jax import chat as chat_cli  # noqa: E402
from vllama_jax.infer import chat as chat_module  # noqa: E402
from vllama_jax.errors import ConfigError  # noqa: E402
from vllama_jax.infer.chat import Request, VideoChat  # noqa: E402
from vllama_jax.infer.generate import Generator  # noqa: E402
from vllama_jax.media import MediaError  # noqa: E402
from vllama_jax.random_checkpoint import write_random_video_llama  # noqa: E402
from vllama_jax.text.prompt import layout  # noqa: E402

NEW = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("chat")
  write_random_video_llama(str(d / "ckpt"), seed=1)
  write_media(str(d / "av.mp4"), tone_mix(3.0, 44100, 2), rate=44100)
  write_media(str(d / "av_long.mp4"), tone_mix(5.0, 16000, 1, seed=2), rate=16000)
  write_media(str(d / "silent.mp4"), None)
  write_media(str(d / "tone.wav"), tone_mix(2.5, 16000, 1, seed=3), rate=16000, video=False, codec="pcm_s16le")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)).save(d / "image.png")
  return {name: str(d / name) for name in ("ckpt", "av.mp4", "av_long.mp4", "silent.mp4", "tone.wav", "image.png")}


@pytest.fixture(scope="module")
def chat(files):
  return VideoChat.from_pretrained(files["ckpt"])


def greedy(chat, **changes):
  return chat.sampling(max_new_tokens=NEW, greedy=True, **changes)


def test_each_input_kind_gets_its_mode_and_placeholder_rows(chat, files):
  cfg = chat.model.config
  video_rows, audio_rows = cfg.video.video_qformer.num_query_tokens, cfg.audio.qformer.num_query_tokens
  cases = {
      Request("q", video=files["av.mp4"]): ("audio_video", [audio_rows, video_rows]),
      Request("q", video=files["av.mp4"], use_audio=False): ("video", [video_rows]),
      Request("q", video=files["silent.mp4"]): ("video", [video_rows]),  # no audio track: video only
      Request("q", image=files["image.png"]): ("image", [video_rows]),
      Request("q", audio=files["tone.wav"]): ("audio", [audio_rows]),
  }
  media = chat.encode_many(list(cases))
  for m, (mode, rows) in zip(media, cases.values()):
    assert m.mode == mode
    assert [e.shape for e in m.embeddings] == [(n, cfg.llama.hidden_size) for n in rows]
  assert media[0].time_hint.startswith("The video contains 8 frames sampled at 0.0, ")
  # Encoding in a batch gives what encoding alone gives.
  alone = chat.encode(files["av.mp4"])
  for a, b in zip(alone.embeddings, media[0].embeddings):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_prompt_embeddings_splice_audio_then_video_into_the_placeholders(chat, files):
  media = chat.encode(files["av.mp4"])
  session = chat.session(media=media)
  session.conversation.ask("What do you hear?")
  embeds = chat._prompt_embeddings(session.conversation, media, NEW)
  rows = layout(chat.tokenizer, session.conversation.prompt(), [e.shape[0] for e in media.embeddings])
  model = chat.model
  expected = model.embed(jnp.asarray(rows.ids)[None], jnp.asarray(rows.source)[None],
                         jnp.concatenate(media.embeddings)[None])[0]
  np.testing.assert_array_equal(np.asarray(embeds), np.asarray(expected))
  audio_start = int(np.argmax(rows.source == 0))
  n_audio = media.embeddings[0].shape[0]
  np.testing.assert_array_equal(np.asarray(embeds[audio_start:audio_start + n_audio]),
                                np.asarray(media.embeddings[0]))
  text = np.asarray(model.llama.embed(jnp.asarray(rows.ids)))
  np.testing.assert_array_equal(np.asarray(embeds)[rows.source < 0], text[rows.source < 0])
  assert rows.ids[0] == chat.tokenizer.bos_id and (rows.ids[1:] != chat.tokenizer.bos_id).all()


def test_batched_answers_equal_one_by_one_and_do_not_recompile(chat, files):
  requests = [Request("What is happening?", video=files["av.mp4"]),
              Request("Describe the image in detail, please.", image=files["image.png"]),
              Request("What sound is it?", audio=files["tone.wav"]),
              Request("And without sound?", video=files["av_long.mp4"], use_audio=False),
              Request("Longer video with its sound: what happens at the end?", video=files["av_long.mp4"])]
  batched = chat.ask_batch(requests, sampling=greedy(chat))
  alone = [chat.ask_batch([r], sampling=greedy(chat))[0] for r in requests]
  assert batched == alone
  assert len(set(batched)) > 1  # different inputs, different answers
  # Sampling: row i of a batch uses seed + i, so a row alone with that seed samples the same.
  sampled = chat.ask_batch(requests, sampling=chat.sampling(max_new_tokens=NEW, seed=7))
  assert sampled[3] == chat.ask_batch([requests[3]], sampling=chat.sampling(max_new_tokens=NEW, seed=10))[0]
  programs = (Generator.compiled_programs(), chat_module._encode_video._cache_size(),
              chat_module._encode_audio._cache_size())
  again = chat.ask_batch(requests[::-1], sampling=chat.sampling(max_new_tokens=NEW, seed=7, temperature=0.7))
  assert len(again) == len(requests)
  assert (Generator.compiled_programs(), chat_module._encode_video._cache_size(),
          chat_module._encode_audio._cache_size()) == programs


def test_session_keeps_media_and_history_and_streams_its_answer(chat, files, monkeypatch):
  session = chat.session(files["av.mp4"])
  calls = []
  monkeypatch.setattr(chat, "encode_many", lambda *a, **k: calls.append(a) or [])
  pieces = []
  first = session.ask("What is happening?", sampling=greedy(chat), on_text=pieces.append)
  assert "".join(pieces).strip() == first
  second = session.ask("Tell me more.", sampling=greedy(chat))
  assert calls == []  # the follow-up re-used the encoded media
  roles = chat.template.roles
  assert [role for role, _ in session.history] == [roles[0], roles[1], roles[0], roles[1]]
  assert session.history[1][1] == first and session.history[3][1] == second
  c = session.conversation
  assert f"{roles[1]}: {first}###{roles[0]}: Tell me more.###" in chat_module.conv.render(c.template, c.system,
                                                                                         c.messages)
  # The same question in a fresh session answers as the first turn did.
  fresh = chat.session(media=session.media)
  assert fresh.ask("What is happening?", sampling=greedy(chat)) == first


def test_bad_inputs_are_clear_errors(chat, files, tmp_path):
  with pytest.raises(MediaError, match="nope.mp4"):
    chat.encode(str(tmp_path / "nope.mp4"))
  with pytest.raises(MediaError, match="no audio"):
    chat.encode(audio=files["silent.mp4"])
  with pytest.raises(ValueError, match="exactly one"):
    chat.encode(files["av.mp4"], image=files["image.png"])


def test_cli_answers_a_jsonl_file_and_reports_bad_lines(files, tmp_path, capsys):
  questions = tmp_path / "q.jsonl"
  lines = [{"id": "a", "video": files["av.mp4"], "question": "What is it?"},
           {"id": "b", "image": files["image.png"], "question": "And this?"},
           {"id": "c", "video": str(tmp_path / "missing.mp4"), "question": "?"},
           {"id": "d", "question": "no media"}]
  questions.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  out = tmp_path / "answers.jsonl"
  args = ["--checkpoint", files["ckpt"], "--questions", str(questions), "--output", str(out),
          "--max-new-tokens", str(NEW), "--greedy", "--batch-size", "3"]
  assert chat_cli.main(args) == 0
  results = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in results] == ["a", "b", "c", "d"]
  chat = VideoChat.from_pretrained(files["ckpt"])
  expected = chat.ask_batch([Request("What is it?", video=files["av.mp4"]),
                             Request("And this?", image=files["image.png"])], sampling=greedy(chat))
  assert [r.get("answer") for r in results[:2]] == expected
  assert "missing.mp4" in results[2]["error"] and "exactly one" in results[3]["error"]
  assert "2 question(s) could not be answered" in capsys.readouterr().err
  assert chat_cli.main(args + ["--overwrite"]) == 0  # a second run replaces its answers only when asked
  assert [json.loads(line) for line in out.read_text().splitlines()] == results


@pytest.mark.parametrize("case,message", [
    ("output exists", "--output {out} exists; pass --overwrite to replace it"),
    ("output is the questions", "--output {questions} exists; pass --overwrite to replace it"),
    ("no questions file", "--questions {missing}: no such file"),
    ("output without questions", "--output goes with --questions")])
def test_cli_keeps_what_the_user_saved(tmp_path, capsys, case, message):
  """Checked before the model loads (the checkpoint here does not exist): a saved file is never truncated."""
  questions, out, missing = tmp_path / "q.jsonl", tmp_path / "answers.jsonl", tmp_path / "none.jsonl"
  questions.write_text('{"question": "?", "video": "v.mp4"}\n')
  out.write_text("saved\n")
  args = {"output exists": ["--questions", str(questions), "--output", str(out)],
          "output is the questions": ["--questions", str(questions), "--output", str(questions)],
          "no questions file": ["--questions", str(missing)],
          "output without questions": ["--video", "v.mp4", "--output", str(tmp_path / "new.jsonl")]}[case]
  with pytest.raises(SystemExit) as exit_info:
    chat_cli.main(["--checkpoint", str(tmp_path / "no-checkpoint")] + args)
  assert exit_info.value.code == 2
  assert message.format(out=out, questions=questions, missing=missing) in capsys.readouterr().err
  assert out.read_text() == "saved\n" and questions.read_text() == '{"question": "?", "video": "v.mp4"}\n'


def test_cli_streams_a_single_answer(files, capsys):
  args = ["--checkpoint", files["ckpt"], "--video", files["av.mp4"], "--question", "What is it?",
          "--max-new-tokens", str(NEW), "--greedy"]
  assert chat_cli.main(args) == 0
  captured = capsys.readouterr()
  chat = VideoChat.from_pretrained(files["ckpt"])
  assert captured.out.strip() == chat.ask(files["av.mp4"], "What is it?", sampling=greedy(chat))
  assert "[audio_video (The video contains 8 frames" in captured.err
  assert chat_cli.main(["--checkpoint", files["ckpt"], "--video", "/nonexistent.mp4", "--question", "x"]) == 2
  assert "nonexistent.mp4" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--num-frames", "0"), ("--batch-size", "0"), ("--batch-size", "two")])
def test_cli_counts_below_one_are_usage_errors(files, capsys, flag, value):
  with pytest.raises(SystemExit) as exit_info:
    chat_cli.main(["--checkpoint", files["ckpt"], "--video", files["av.mp4"], "--question", "x", flag, value])
  assert exit_info.value.code == 2
  assert f"argument {flag}: expected an integer >= 1, got '{value}'" in capsys.readouterr().err
  with pytest.raises(ConfigError, match="num_frames must be at least 1, got 0"):
    VideoChat.from_pretrained(files["ckpt"], num_frames=0)


@pytest.mark.parametrize("flag,value,message", [
    ("--top-k", "-5", "top_k must be >= 0 (0: off), got -5"),
    ("--temperature", "0", "temperature must be > 0 when sampling, got 0.0"),
    ("--repetition-penalty", "0", "repetition_penalty must be > 0 (1: off), got 0.0")])
def test_cli_bad_sampling_fails_before_the_model_loads(tmp_path, capsys, flag, value, message):
  missing = str(tmp_path / "no-checkpoint")  # loading it would fail: the sampling error must come first
  assert chat_cli.main(["--checkpoint", missing, "--video", "v.mp4", "--question", "x", flag, value]) == 2
  assert capsys.readouterr().err.strip() == f"error: {message}"


def test_a_sharded_chat_answers_as_one_device(chat, files):
  from vllama_jax import sharding
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = VideoChat.from_pretrained(files["ckpt"], mesh)
  assert len(sharded.model.llama.embed_tokens[...].sharding.device_set) == 8
  requests = [Request("What is happening?", video=files["av.mp4"]), Request("And here?", image=files["image.png"])]
  with jax.set_mesh(mesh):
    answers = sharded.ask_batch(requests, sampling=greedy(sharded))
  assert answers == chat.ask_batch(requests, sampling=greedy(chat))
