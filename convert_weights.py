"""Convert released PyTorch / Hugging Face checkpoints into one vllama_jax directory.

  python convert_weights.py --llama /path/to/hf-llama-dir --out converted/ [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import time

from vllama_jax.errors import VllamaError


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--llama", required=True, help="Hugging Face LLaMA/Vicuna directory (config.json, "
                      "weights as *.safetensors or pytorch_model*.bin with their index, tokenizer files)")
  parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="dtype of the converted weights (default: bfloat16)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from vllama_jax.convert.llama import convert_llama_checkpoint
  start = time.time()
  try:
    cfg = convert_llama_checkpoint(args.llama, args.out, dtype=args.dtype)
  except VllamaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"converted LLaMA ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{args.dtype}) to {args.out} in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
