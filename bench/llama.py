"""Benchmark: our JAX LLaMA vs. Hugging Face's PyTorch LlamaForCausalLM with the same weights, on this CPU
or on a GPU (`--device`: where JAX's default backend is a GPU, torch runs on CUDA and its timed calls
synchronise).

Times a full forward pass (logits) and greedy KV-cache decoding from prompt embeddings, checks that
both frameworks agree, and prints PyTorch/JAX time ratios (> 1 means JAX is faster).

  python bench/llama.py                     # hidden 1024, 8 layers, seq 512 x batch 4, decode 1 and 8
  python bench/llama.py --dtype bfloat16 --eager
  python bench/llama.py --quick             # tiny smoke configuration
  python bench/llama.py --dtype bfloat16    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from timing import median_times, synced, torch_device, torch_where  # noqa: E402
from vllama_jax.torch_compat import install_torchvision_shim  # noqa: E402

install_torchvision_shim()  # before transformers imports a model (and with it torchvision)

import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import convert_weights  # noqa: E402
from vllama_jax.infer.generate import Generator  # noqa: E402
from vllama_jax.infer.sampling import SamplingConfig  # noqa: E402
from vllama_jax.pretrained import load_llama  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=None, help="default: hidden // 64")
  p.add_argument("--ffn", type=int, default=None, help="default: 2816 for hidden 1024, else ~8/3 hidden")
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--seq", type=int, default=512, help="forward sequence length")
  p.add_argument("--batch", type=int, default=4, help="forward batch")
  p.add_argument("--prompt", type=int, default=128, help="decode prompt length (embeddings)")
  p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--eager", action="store_true", help="also time HF attn_implementation='eager'")
  p.add_argument("--scanned-decode", action="store_true",
                 help="also time decoding with the scanned (stacked) layer layout")
  p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                 help="PyTorch's device (auto: cuda where JAX's default backend is a GPU and torch sees one)")
  p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
  args = p.parse_args(argv)
  args.device = torch_device(args.device)
  if args.quick:
    args.hidden, args.layers, args.vocab, args.seq, args.batch = 128, 2, 1000, 64, 2
    args.prompt, args.new_tokens, args.repeats, args.ffn = 32, 16, 2, None
  args.heads = args.heads or max(1, args.hidden // 64)
  args.ffn = args.ffn or (2816 if args.hidden == 1024 else 256 * -(-8 * args.hidden // 3 // 256))
  return args


def build_models(args, workdir: str):
  """Random HF model (seed 0) -> save_pretrained -> convert_weights -> load_llama."""
  torch_dtype = getattr(torch, args.dtype)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
      rms_norm_eps=1e-6, max_position_embeddings=max(2048, args.seq, args.prompt + args.new_tokens),
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).to(torch_dtype).eval()
  hf_dir, out_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "converted")
  hf.save_pretrained(hf_dir)
  with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
    f.write("{}")  # the converter copies tokenizer files; none is needed here
  if convert_weights.main(["--llama", hf_dir, "--out", out_dir, "--dtype", args.dtype]) != 0:
    raise SystemExit("conversion failed")
  return hf.to(args.device), out_dir


def hf_variant(hf, attn: str):
  hf.set_attn_implementation(attn)  # same modules and weights; only the attention kernel changes
  return hf


def bench_forward(args, hf, model, attn_impls, rows):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, args.vocab, size=(args.batch, args.seq), dtype=np.int64)
  mask = np.ones_like(ids)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)

  j_ids, j_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  start = time.perf_counter()
  j_logits = forward(state, j_ids, j_mask).block_until_ready()
  compile_s = time.perf_counter() - start
  j_logits = np.asarray(j_logits)

  t_ids, t_mask = torch.from_numpy(ids).to(args.device), torch.from_numpy(mask).to(args.device)
  fns, t_logits = {"jax": lambda: forward(state, j_ids, j_mask).block_until_ready()}, {}
  with torch.inference_mode():
    for attn in attn_impls:
      model_t = hf_variant(hf, attn)
      t_logits[attn] = model_t(t_ids, attention_mask=t_mask).logits.float().cpu().numpy()  # warm-up
      fns[attn] = synced(lambda attn=attn: hf_variant(hf, attn)(t_ids, attention_mask=t_mask), args.device)
    secs = median_times(fns, args.repeats)
  for attn in attn_impls:
    diff = np.abs(t_logits[attn] - j_logits)
    same_argmax = (t_logits[attn].argmax(-1) == j_logits.argmax(-1)).mean()
    print(f"forward [{attn}]: max |logit diff| {diff.max():.3e} (max |logit| "
          f"{np.abs(t_logits[attn]).max():.3e}), argmax agreement {same_argmax:.4f}")
    tokens = args.batch * args.seq
    j_s, t_s = secs["jax"], secs[attn]
    rows.append((f"forward B{args.batch}xT{args.seq} [{attn}]", j_s, t_s,
                 f"{tokens / j_s:.0f} / {tokens / t_s:.0f} tok/s"))
  print(f"forward: JAX compile + first run {compile_s:.2f}s")


def bench_decode(args, hf, model, batch, attn_impls, rows, label=""):
  torch.manual_seed(1)
  ids = torch.randint(3, args.vocab, (batch, args.prompt)).to(args.device)
  with torch.inference_mode():
    embeds_t = hf.get_input_embeddings()(ids)  # identical prompt embeddings for both frameworks
  embeds_np = embeds_t.float().cpu().numpy()
  prompts = [jnp.asarray(embeds_np[i], model.dtype) for i in range(batch)]
  cfg = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True, eos_token_id=None)
  gen = Generator(model, length_multiple=64)

  start = time.perf_counter()
  j_tokens = gen(prompts, cfg).tokens
  compile_s = time.perf_counter() - start

  mask = torch.ones(batch, args.prompt, dtype=torch.long, device=args.device)

  def hf_generate(attn, new_tokens=args.new_tokens):
    return hf_variant(hf, attn).generate(
        inputs_embeds=embeds_t, attention_mask=mask, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

  # One new token = prefill (+ one sampling step): subtracted to get the per-token decode cost.
  prefill_cfg = SamplingConfig(max_new_tokens=1, greedy=True, eos_token_id=None)
  gen(prompts, prefill_cfg)
  fns = {"jax": lambda: gen(prompts, cfg), "jax prefill": lambda: gen(prompts, prefill_cfg)}
  with torch.inference_mode():
    for attn in attn_impls:
      t_tokens = hf_generate(attn)[:, -args.new_tokens:].cpu().numpy()  # warm-up; holds only new tokens
      match = np.array_equal(t_tokens, j_tokens)
      first_diff = "" if match else (
          f", first mismatch at step {int(np.argmax((t_tokens != j_tokens).any(0)))}")
      print(f"decode B{batch} [{attn}]: generated tokens identical: {match}{first_diff}")
      fns[attn] = synced(lambda attn=attn: hf_generate(attn), args.device)
      fns[attn + " prefill"] = synced(lambda attn=attn: hf_generate(attn, 1), args.device)
    secs = median_times(fns, args.repeats)
  new = batch * args.new_tokens
  steps = args.new_tokens - 1
  for attn in attn_impls:
    j_s, t_s = secs["jax"], secs[attn]
    rows.append((f"generate B{batch} P{args.prompt}+{args.new_tokens}{label} [{attn}]", j_s, t_s,
                 f"{new / j_s:.1f} / {new / t_s:.1f} tok/s"))
    j_step = (j_s - secs["jax prefill"]) / steps
    t_step = (t_s - secs[attn + " prefill"]) / steps
    rows.append(("  per decode step after prefill", j_step, t_step,
                 f"{batch / j_step:.1f} / {batch / t_step:.1f} tok/s"))
  print(f"decode B{batch}{label}: JAX compile + first run {compile_s:.2f}s")


def print_table(rows):
  header = ("metric", "JAX ms", "PyTorch ms", "ratio PT/JAX", "throughput JAX / PT")
  lines = [header] + [(name, f"{j * 1e3:.1f}", f"{t * 1e3:.1f}", f"{t / j:.2f}", extra)
                      for name, j, t, extra in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  fmt = lambda line: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in
                              enumerate(zip(line, widths)))
  print(fmt(header))
  print("  ".join("-" * w for w in widths))
  for line in lines[1:]:
    print(fmt(line))


def main(argv=None) -> int:
  args = parse_args(argv)
  print(f"jax {jax.__version__} devices {jax.devices()}; torch {torch.__version__} on {args.device} "
        f"({torch_where(args.device)}); transformers {transformers.__version__}")
  print("config:", json.dumps({k: getattr(args, k) for k in (
      "hidden", "layers", "heads", "ffn", "vocab", "seq", "batch", "prompt", "decode_batches",
      "new_tokens", "dtype", "repeats")}))
  attn_impls = ["sdpa", "eager"] if args.eager else ["sdpa"]
  with tempfile.TemporaryDirectory() as workdir:
    hf, out_dir = build_models(args, workdir)
    scanned = load_llama(out_dir)  # lax.scan over stacked layers: the training layout
    looped = load_llama(out_dir, scan_layers=False)  # a list of layers: no weight slicing per step
  rows = []
  bench_forward(args, hf, scanned, attn_impls, rows)
  for batch in args.decode_batches:
    bench_decode(args, hf, looped, batch, attn_impls, rows, label=" layer-list")
    if args.scanned_decode:
      bench_decode(args, hf, scanned, batch, attn_impls, rows, label=" scanned")
  print()
  print_table(rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
