"""Ask Video-LLaMA about videos, images and sounds from the command line.

  python -m vllama_jax.chat --checkpoint DIR --video clip.mp4 --question "What happens?"
  python -m vllama_jax.chat --checkpoint DIR --video clip.mp4            # interactive, multi-turn
  python -m vllama_jax.chat --checkpoint DIR --questions todo.jsonl --output answers.jsonl

A --questions file has one JSON object per line: {"question": ..., "video" | "image" | "audio": path,
"use_audio": bool (optional), any other keys are copied to the output}. Relative paths are taken
from the file's directory. Lines whose media cannot be read get an "error" instead of an "answer";
the rest still run. Answers stream to stdout for a single question.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vllama_jax.cli import positive_int
from vllama_jax.errors import VllamaError

MEDIA_KEYS = ("video", "image", "audio")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="a directory written by convert_weights.py")
  media = parser.add_mutually_exclusive_group()
  media.add_argument("--video", help="a video file (its audio track is used when the model has an audio branch)")
  media.add_argument("--image", help="an image file")
  media.add_argument("--audio", help="an audio file (or a video whose sound alone is asked about)")
  media.add_argument("--questions", help="a JSONL file of questions for batch work")
  parser.add_argument("--question", help="the question; without it, questions are read from stdin")
  parser.add_argument("--no-audio", action="store_true", help="ignore the audio track of --video")
  parser.add_argument("--output", help="with --questions: a new file for the answers (default: stdout)")
  parser.add_argument("--overwrite", action="store_true", help="replace an --output file that exists")
  parser.add_argument("--batch-size", type=positive_int, default=8, help="with --questions: questions per batch")
  parser.add_argument("--template", choices=("vicuna", "llama_2"), help="override the recorded chat template")
  parser.add_argument("--num-frames", type=positive_int, default=8, help="frames sampled per video (default 8)")
  sampling = parser.add_argument_group("sampling (defaults: the reference demo's)")
  sampling.add_argument("--max-new-tokens", type=int, default=300)
  sampling.add_argument("--temperature", type=float, default=1.0)
  sampling.add_argument("--top-p", type=float, default=0.9)
  sampling.add_argument("--top-k", type=int, default=0)
  sampling.add_argument("--repetition-penalty", type=float, default=1.0)
  sampling.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
  sampling.add_argument("--seed", type=int, default=0, help="sampling seed (row i of a batch uses seed + i)")
  args = parser.parse_args(argv)
  if args.questions is None and not (args.video or args.image or args.audio):
    parser.error("give --video, --image, --audio or --questions")
  if args.questions and args.question:
    parser.error("--question goes with --video/--image/--audio, not with --questions")
  if args.output and not args.questions:
    parser.error("--output goes with --questions")
  if args.questions and not os.path.isfile(args.questions):
    parser.error(f"--questions {args.questions}: no such file")
  if args.output and os.path.exists(args.output) and not args.overwrite:
    parser.error(f"--output {args.output} exists; pass --overwrite to replace it")
  return args


def sampling_knobs(args) -> dict:
  return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, repetition_penalty=args.repetition_penalty, greedy=args.greedy, seed=args.seed)


def sampling_config(chat, args):
  return chat.sampling(**sampling_knobs(args))


def read_requests(path: str, use_audio: bool) -> list[tuple[dict, object]]:
  """(the line's JSON, a Request or the error message) per non-empty line."""
  from vllama_jax.infer.chat import Request
  base = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      item = {"line": number}
      try:
        item = json.loads(line)
        given = [k for k in MEDIA_KEYS if item.get(k)]
        if not isinstance(item.get("question"), str) or len(given) != 1:
          raise ValueError("expected a \"question\" string and exactly one of \"video\", \"image\", \"audio\"")
        media = {k: _resolve(item[k], base) for k in given}
        out.append((item, Request(item["question"], use_audio=use_audio and item.get("use_audio", True), **media)))
      except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as e:
        out.append((item if isinstance(item, dict) else {"line": number}, f"{path}:{number}: {e}"))
  return out


def _resolve(p: str, base: str) -> str:
  return p if os.path.isabs(p) or os.path.exists(p) else os.path.join(base, p)


def answer_file(chat, args) -> int:
  """Answers a JSONL file in batches; returns how many lines failed."""
  from tqdm import tqdm
  items = read_requests(args.questions, not args.no_audio)
  out = open(args.output, "w") if args.output else sys.stdout
  failed, config = 0, sampling_config(chat, args)
  try:
    with tqdm(total=len(items), unit="q", file=sys.stderr, disable=None) as bar:
      for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        results = [None if not isinstance(r, str) else {"error": r} for _, r in chunk]
        runnable = _encode(chat, [(k, r) for k, (_, r) in enumerate(chunk) if results[k] is None], results)
        if runnable:
          answers = chat.generate(
              [_conversation(chat, media, request) for _, media, request in runnable],
              [media for _, media, _ in runnable], sampling=config,
              seeds=[args.seed + start + k for k, _, _ in runnable])
          for (k, _, _), answer in zip(runnable, answers):
            results[k] = {"answer": answer}
        for (item, _), result in zip(chunk, results):
          failed += "error" in result
          out.write(json.dumps(item | result) + "\n")
        out.flush()
        bar.update(len(chunk))
  finally:
    if out is not sys.stdout:
      out.close()
  return failed


def _encode(chat, requests, results):
  """[(index, Media, Request)] of the requests whose media encode; the others get an error result.
  All are encoded as one batch; when one fails, each is retried alone to find which."""
  try:
    media = chat.encode_many([r for _, r in requests])
    return [(k, m, r) for (k, r), m in zip(requests, media)]
  except VllamaError:
    pass
  encoded = []
  for k, request in requests:
    try:
      encoded.append((k, chat.encode_many([request])[0], request))
    except VllamaError as e:
      results[k] = {"error": str(e)}
  return encoded


def _conversation(chat, media, request):
  from vllama_jax.text.conversation import Conversation
  conversation = Conversation.start(chat.template, media.mode, media.time_hint)
  conversation.ask(request.question)
  return conversation


def converse(chat, args) -> None:
  """One question (--question), or a multi-turn chat on stdin, with answers streamed to stdout."""
  session = chat.session(args.video, image=args.image, audio=args.audio, use_audio=not args.no_audio)
  config = sampling_config(chat, args)
  hint = f" ({session.media.time_hint.strip()})" if session.media.time_hint else ""
  print(f"[{session.media.mode}{hint}]", file=sys.stderr)
  questions = [args.question] if args.question else _stdin_questions()
  for turn, question in enumerate(questions):
    start = time.time()
    session.ask(question, sampling=config, seed=args.seed + turn,
                on_text=lambda text: print(text, end="", flush=True))
    print()
    print(f"[{time.time() - start:.1f}s]", file=sys.stderr)


def _stdin_questions():
  interactive = sys.stdin.isatty()
  while True:
    if interactive:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
      return
    if line.strip():
      yield line.strip()


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    from vllama_jax.infer.chat import VideoChat
    from vllama_jax.infer.sampling import SamplingConfig
    SamplingConfig(**sampling_knobs(args))  # bad knobs fail now, not after minutes of loading
    chat = VideoChat.from_pretrained(args.checkpoint, template=args.template, audio=not args.no_audio,
                                     num_frames=args.num_frames)
    if args.questions:
      failed = answer_file(chat, args)
      if failed:
        print(f"{failed} question(s) could not be answered; see their \"error\" field", file=sys.stderr)
      return 0
    converse(chat, args)
  except VllamaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
