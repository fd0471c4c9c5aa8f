"""The embedded default job (until training lands): random LLaMA -> convert -> load -> generate.

  python -m vllama_jax.demo [--config configs/demo.py:tiny] [--config.sampling.greedy=true]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from vllama_jax import random_checkpoint, sharding
from vllama_jax.cli import parse_config_args
from vllama_jax.config import LlamaConfig
from vllama_jax.convert.llama import convert_llama_checkpoint
from vllama_jax.errors import VllamaError
from vllama_jax.infer.generate import Generator
from vllama_jax.infer.sampling import SamplingConfig
from vllama_jax.pretrained import load_llama
from vllama_jax.text.tokenizer import load_tokenizer

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")


def vicuna_prompt(question: str) -> str:
  return f"###Human: {question}###Assistant:"


def run(config, workdir: str) -> list[str]:
  hf_dir, out_dir = os.path.join(workdir, "hf_llama"), os.path.join(workdir, "converted")
  cfg = LlamaConfig(**config.llama.to_dict(), dtype="float32")
  print(f"[1/4] writing a random Hugging Face LLaMA ({cfg.num_layers} layers, hidden {cfg.hidden_size}) "
        f"and a SentencePiece tokenizer to {hf_dir}")
  random_checkpoint.write_tokenizer(hf_dir, vocab_size=cfg.vocab_size)
  random_checkpoint.write_hf_llama(hf_dir, cfg, seed=config.seed)

  print(f"[2/4] converting to {out_dir} ({config.dtype})")
  convert_llama_checkpoint(hf_dir, out_dir, dtype=config.dtype)

  mesh = sharding.make_mesh(tuple(config.mesh))
  print(f"[3/4] loading onto a mesh {dict(mesh.shape)} of {jax.devices()[0].platform} devices")
  model = load_llama(out_dir, mesh, scan_layers=False)  # a layer list decodes faster than a scan
  tokenizer = load_tokenizer(out_dir)

  print("[4/4] generating, batched")
  stop = (tuple(tokenizer.encode("###")),)
  sampling = SamplingConfig(**config.sampling.to_dict(), stop_sequences=stop,
                            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                            seed=config.seed)
  prompts = []
  for question in config.questions:
    ids = [tokenizer.bos_id] + tokenizer.encode(vicuna_prompt(question))
    prompts.append(model.embed(jnp.asarray(ids)))
  generator = Generator(model)
  with jax.set_mesh(mesh):
    start = time.time()
    first = generator(prompts, sampling)
    compile_and_run = time.time() - start
    start = time.time()
    out = generator(prompts, sampling)
    run_time = time.time() - start
  answers = [tokenizer.decode(row).split("###")[0].strip() for row in out.rows()]
  for question, answer, n in zip(config.questions, answers, out.lengths):
    print(f"  Q: {question}\n  A ({n} tokens, random weights): {answer!r}")
  assert (first.tokens == out.tokens).all(), "same seed, same tokens"
  print(f"first call (compile + run) {compile_and_run:.2f}s; second call {run_time:.3f}s, "
        f"{int(out.lengths.sum()) / run_time:.0f} tokens/s; compiled programs: {Generator.compiled_programs()}")
  return answers


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    config, rest = parse_config_args(argv, DEFAULT_CONFIG)
    if rest:
      raise VllamaError(f"unknown arguments {rest}; this job takes only --config and --config.<key>=<value>")
    if config.workdir:
      os.makedirs(config.workdir, exist_ok=True)
      run(config, config.workdir)
    else:
      with tempfile.TemporaryDirectory(prefix="vllama_demo_") as workdir:
        run(config, workdir)
  except VllamaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
