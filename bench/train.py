"""Benchmark, training (issue 6): one VL-stage train step, ours vs a PyTorch reference step with the
same weights, timed in turns in one run, on this CPU or on a GPU (`--device`).

Weights: bench/e2e.py's `build` makes a reduced Video-LLaMA with the torch references (transformers'
Blip2VisionModel / Blip2QFormerModel with tests' TorchVideoBranch glue, LlamaForCausalLM), writes the
released files and converts them with convert_weights.main; ours is `load_video_llama` on that, with
scanned LLaMA layers as train.py loads it (`--layer-list`: the per-layer LLaMA instead).

One step, fp32 on both sides, one fixed synthetic batch (random frames (B, 8, 224, 224, 3); per row BOS,
the 32 video rows, then random text of varying length, right-padded; labels -100 on BOS, video rows
and padding, as the reference's stage-1 batches):
  ours   make_train_step(..., "video", dropout=False) on split_trainable(model, "vl"), AdamW from
         make_optimizer (constant lr 1e-4), the state donated.
  torch  TorchVideoBranch (EVA + ln_vision + image Q-Former frozen, eval(), requires_grad False; frame
         positions, video query tokens, video Q-Former, llama_proj trainable) -> [BOS, video, text]
         inputs_embeds -> frozen LlamaForCausalLM loss -> backward -> torch.optim.AdamW on the
         trainables only (0.9, 0.999, eps 1e-8, weight decay 0.05 except rank < 2, "bias", "ln", "bn").
The Q-Former dropout is off on both sides (the reference trains with it on; its cost is negligible
here), so the two sides compute the same losses step after step: they are compared at every step.
The frozen encoders' forward (EVA, ln_vision, image Q-Former) is also timed alone on both sides, to
split the step into that and the rest. Ratio = PyTorch time / ours (> 1: ours faster).

Frozen in bf16: the same step with the frozen weights as convert_weights writes them by default (EVA,
ln_vision, image Q-Former and LLaMA in bf16; what trains in fp32), against PyTorch with the same modules
cast to bf16 and its trainable part in fp32, the video rows entering the LLaMA in bf16. Each side rounds
its own way: the losses are compared at 2e-2.

MFU: our step's matmul FLOPs as `train_step.flops` counts them on its jaxpr (every scanned LLaMA
layer and EVA block included; the count train.py's MFU uses) over this machine's measured fp32 matmul
rate (`metrics.peak_flops`).

Bound: the step's largest matmul (EVA's MLP input projection, every frame's tokens at once) timed alone
with each library, in turns with the steps. A step cannot run its matmul FLOPs faster than the faster
of the two fp32 rates, so torch step time / (FLOPs / that rate) bounds the ratio any implementation of
the same fp32 step can reach on this machine. With the bf16 rows the same matmul is timed in bf16 too.
EVA's self-attention is also timed alone (fp32, every frame at once), ours against PyTorch's fused
scaled_dot_product_attention: the part of the frozen encoders' gap that is not matmul rate.

  python bench/train.py            # reduced config (printed); a few minutes on 2 idle CPU cores
  python bench/train.py --quick    # tiny smoke configuration

On a GPU (JAX's default backend a GPU, torch built with CUDA) PyTorch runs there too (`--device auto`),
every timed torch call ends in torch.cuda.synchronize(), the bf16 rows are on by default, and fp32
matmuls are full fp32 on both sides (JAX's default would use TF32 where torch's does not). Set
XLA_PYTHON_CLIENT_MEM_FRACTION so that JAX leaves room for torch. bench/device.sh runs it so on a lent
GPU machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (puts the repository and tests/ on the path, installs the torchvision shim)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from timing import median_times, synced, torch_device, torch_where  # noqa: E402
from vllama_jax.layers.attention import dot_product_attention  # noqa: E402
from vllama_jax.layers.linear import matmul as matmul_ours  # noqa: E402
from vllama_jax.pretrained import load_video_llama  # noqa: E402
from vllama_jax.train import metrics  # noqa: E402
from vllama_jax.train.optimizer import OptimizerConfig, decay_mask, make_optimizer  # noqa: E402
from vllama_jax.train.step import init_train_state, make_train_step  # noqa: E402
from vllama_jax.train.trainable import count_params, split_trainable  # noqa: E402

LR, WEIGHT_DECAY, BETAS, EPS = 1e-4, 0.05, (0.9, 0.999), 1e-8
TOLERANCE = 1e-4  # relative, on the loss
HALF_TOLERANCE = 2e-2  # the same with the frozen weights in bf16 (against the other side and against fp32)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vit-width", type=int, default=1408)
  p.add_argument("--vit-depth", type=int, default=1, help="EVA blocks (the release uses 39)")
  p.add_argument("--image-qformer-layers", type=int, default=2, help="the release uses 12")
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--text-length", type=int, default=128, help="sequence length, video rows included")
  p.add_argument("--repeats", type=int, default=None, help="timed turns (default 3, --quick 10)")
  p.add_argument("--layer-list", action="store_true", help="time our step with the LLaMA layers as a list")
  p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                 help="the frozen-in-bf16 rows (default: on a GPU, or where the CPU has bf16 units, avx512_bf16 "
                      "or amx_bf16; without them PyTorch's bf16 step takes minutes)")
  p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                 help="PyTorch's device (auto: cuda where JAX's default backend is a GPU and torch sees one); "
                      "ours runs on JAX's default backend")
  p.add_argument("--quick", action="store_true")
  args = p.parse_args(argv)
  args.device = torch_device(args.device)
  if args.bf16 is None:
    args.bf16 = args.device.type == "cuda" or cpu_has_bf16_units()
  args.audio_depth = 1  # e2e.configs makes an audio branch config too; it is never built here
  if args.quick:
    args.hidden, args.layers, args.vocab, args.batch, args.text_length = 64, 2, 1000, 2, 48
  if args.repeats is None:
    args.repeats = 10 if args.quick else 3
  return args


def cpu_has_bf16_units() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      flags = f.read()
  except OSError:
    return False
  return "avx512_bf16" in flags or "amx_bf16" in flags


def make_batch(args, image_size, queries, seed=0) -> dict:
  """numpy arrays: ids, source, labels, attention_mask (B, L) and frames (B, T, S, S, 3)."""
  rng = np.random.default_rng(seed)
  b, length = args.batch, args.text_length
  text = length - 1 - queries
  ids = np.zeros((b, length), np.int32)
  ids[:, 0] = 1  # BOS
  ids[:, 1 + queries:] = rng.integers(3, args.vocab, (b, text))
  source = np.full((b, length), -1, np.int32)
  source[:, 1:1 + queries] = np.arange(queries)
  real = 1 + queries + np.linspace(text // 2, text, b).astype(int)  # per-row lengths, the longest full
  mask = (np.arange(length)[None] < real[:, None]).astype(np.int32)
  ids = np.where(mask, ids, 0)  # pad id 0
  labels = np.where((np.arange(length)[None] > queries) & (mask > 0), ids, -100).astype(np.int32)
  frames = rng.standard_normal((b, args.frames, image_size, image_size, 3), dtype=np.float32)
  return dict(ids=ids, source=source, labels=labels, attention_mask=mask, frames=frames)


# ---- the PyTorch step ----------------------------------------------------------------------------

class TorchStep:
  """Video-LLaMA's VL-stage forward (BOS + video rows + text, HF's shifted-label loss), backward and
  AdamW on the trainables, frozen modules in eval() with requires_grad False."""

  def __init__(self, parts, batch, queries, frozen_dtype=torch.float32, device=torch.device("cpu")):
    self.branch, self.llama = parts["video"].to(device), parts["llama"].to(device)
    self.queries = queries
    self.dtype = frozen_dtype
    self.device = device
    self.branch.eval()  # dropout off everywhere (see the module docstring)
    self.llama.eval()
    for p in self.branch.parameters():
      p.requires_grad_(False)
    for p in self.llama.parameters():
      p.requires_grad_(False)
    for frozen in (self.branch.vision, self.branch.image_qformer, self.llama):
      frozen.to(frozen_dtype)
    # The query tokens are plain tensors beside the modules, moved here by hand.
    self.image_tokens = self.branch.image_keys[1].detach().to(device, frozen_dtype)
    self.video_tokens = self.branch.video_keys[1].detach().to(device).requires_grad_(True)
    named = [("video_query_tokens", self.video_tokens)]
    for prefix in ("video_qformer", "frame_positions", "llama_proj"):
      for name, p in getattr(self.branch, prefix).named_parameters():
        p.requires_grad_(True)
        named.append((f"{prefix}.{name}", p))
    self.trainable = named
    # The reference's rule (LAVIS get_optimizer_params) on the torch names.
    nodecay = lambda n, p: p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n  # noqa: E731
    self.decayed = sum(not nodecay(n, p) for n, p in named)
    self.optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if not nodecay(n, p)], "weight_decay": WEIGHT_DECAY},
         {"params": [p for n, p in named if nodecay(n, p)], "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS)
    frames = torch.from_numpy(np.ascontiguousarray(batch["frames"].transpose(0, 1, 4, 2, 3)))
    self.frames = frames.to(device, frozen_dtype)
    self.ids, self.labels, self.mask = (torch.from_numpy(batch[k]).long().to(device)
                                        for k in ("ids", "labels", "attention_mask"))

  def __call__(self) -> float:
    """TorchVideoBranch.forward with the frozen part in `frozen_dtype` and the trainable part in fp32 (as
    ours runs it); the video rows enter the LLaMA in its dtype."""
    self.optimizer.zero_grad(set_to_none=True)
    b, t = self.frames.shape[:2]
    br = self.branch
    frames = self.frozen_encoders().float()
    positions = br.frame_positions(torch.arange(t, device=self.device))
    frames = frames.reshape(b, t, frames.shape[1], -1) + positions[None, :, None, :]
    video = br.video_qformer(query_embeds=self.video_tokens.expand(b, -1, -1),
                             encoder_hidden_states=frames.reshape(b, -1, frames.shape[-1])).last_hidden_state
    video = br.llama_proj(video).to(self.dtype)  # (B, 32, H)
    embed = self.llama.model.embed_tokens
    q = self.queries
    embeds = torch.cat([embed(self.ids[:, :1]), video, embed(self.ids[:, 1 + q:])], dim=1)
    loss = self.llama(inputs_embeds=embeds, attention_mask=self.mask, labels=self.labels).loss
    loss.backward()
    self.optimizer.step()
    return loss.item()  # waits for the device

  def frozen_encoders(self):
    """The frozen part of the forward alone, as the step runs it (no graph is recorded there)."""
    b, t = self.frames.shape[:2]
    with torch.no_grad():
      embeds = self.branch.vision(pixel_values=self.frames.flatten(0, 1)).last_hidden_state
      tokens = self.image_tokens.expand(b * t, -1, -1)
      return self.branch.image_qformer(query_embeds=tokens, encoder_hidden_states=embeds).last_hidden_state

  def scalars_with_grad(self) -> int:
    return sum(p.numel() for _, p in self.trainable if p.grad is not None)


# ---- ours ----------------------------------------------------------------------------------------

class OurStep:
  """make_train_step on the VL split; the state is carried from call to call (it is donated)."""

  def __init__(self, model, optimizer, batch):
    self.model = model
    self.graphdef, params, self.frozen = split_trainable(model, "vl")
    self.trainable_scalars = count_params(params)
    self.decayed = sum(jax.tree.leaves(decay_mask(params)))
    self.step = make_train_step(self.graphdef, self.frozen, optimizer, "video", dropout=False)
    self.state = init_train_state(params, optimizer)
    self.batch = jax.device_put(batch)

  def from_features(self, optimizer) -> "OurStep":
    """The same step from the same start on the batch's frozen features (as `data.features_dir` feeds
    it): the frames' encodings computed once, here, and only the trainable rest run per step."""
    other = OurStep.__new__(OurStep)
    other.__dict__.update(self.__dict__)
    _, params, _ = split_trainable(self.model, "vl")
    other.state = init_train_state(params, optimizer)
    features = self.frozen_encoders()()
    other.batch = {k: v for k, v in self.batch.items() if k != "frames"} | {"frame_features": features}
    return other

  def __call__(self) -> float:
    self.state, m = self.step(self.state, self.batch)
    jax.block_until_ready(self.state)
    return float(m["loss"])

  def frozen_encoders(self):
    """A jitted forward of the frozen encoders alone (EVA, ln_vision, image Q-Former)."""
    graphdef, state = nnx.split(self.model.video_branch)
    features = jax.jit(lambda s, x: nnx.merge(graphdef, s).frame_features(x))  # no nnx.jit per-call overhead
    return lambda: features(state, self.batch["frames"]).block_until_ready()


def gemm_rates(m: int, k: int, n: int, bf16: bool, device: torch.device):
  """Blocking (m, k) @ (k, n) calls, JAX and PyTorch, on the same random operands: fp32, and with `bf16`
  bf16 operands too (accumulated in fp32 and rounded once, as our `Linear` and torch's bf16 mm run them)."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
  calls = {}
  for name, jdtype, tdtype in (("", jnp.float32, torch.float32), (" bf16", jnp.bfloat16, torch.bfloat16))[:1 + bf16]:
    ja, jb = jax.device_put(a).astype(jdtype), jax.device_put(b).astype(jdtype)
    matmul = jax.jit(matmul_ours)
    matmul(ja, jb).block_until_ready()
    ta, tb = torch.from_numpy(a).to(device, tdtype), torch.from_numpy(b).to(device, tdtype)
    calls |= {f"ours gemm{name}": lambda f=matmul, x=ja, y=jb: f(x, y).block_until_ready(),
              f"torch gemm{name}": synced(lambda x=ta, y=tb: torch.mm(x, y), device)}
  return calls


def attention_calls(frames: int, tokens: int, heads: int, head_dim: int, device: torch.device):
  """EVA's self-attention alone on the step's shape (every frame at once, no mask), fp32: our
  `dot_product_attention` jitted, and PyTorch's `scaled_dot_product_attention` (its fused kernel)."""
  x = np.random.default_rng(0).standard_normal((frames, tokens, heads, head_dim), dtype=np.float32)
  jx = jax.device_put(x)
  ours = jax.jit(lambda q: dot_product_attention(q, q, q, None))
  ours(jx).block_until_ready()
  tx = torch.from_numpy(x).transpose(1, 2).contiguous().to(device)  # (frames, heads, tokens, head_dim)
  sdpa = torch.nn.functional.scaled_dot_product_attention
  return {"ours attention": lambda: ours(jx).block_until_ready(),
          "torch attention": synced(lambda: sdpa(tx, tx, tx), device)}


def main(argv=None) -> int:
  args = parse_args(argv)
  video_cfg, _ = e2e.configs(args)
  v, q = video_cfg.vit, video_cfg.video_qformer
  queries = q.num_query_tokens
  if args.text_length <= 1 + queries:
    raise SystemExit(f"--text-length {args.text_length} leaves no room for text after BOS and {queries} video rows")
  print(f"jax {jax.__version__} {jax.devices()}; torch {torch.__version__} on {args.device} "
        f"({torch_where(args.device)}); transformers {transformers.__version__}; {os.cpu_count()} CPUs")
  print(f"config{' (--quick)' if args.quick else ''}: fp32; EVA width {v.width} heads {v.heads} MLP {v.mlp_dim} "
        f"depth {v.depth} at {v.image_size} px; image Q-Former {video_cfg.image_qformer.num_layers} layers; video "
        f"Q-Former {q.num_layers} layers width {q.hidden_size}, {queries} queries; LLaMA hidden {args.hidden} x "
        f"{args.layers} layers, vocab {args.vocab}; batch {args.batch} x {args.frames} frames, text length "
        f"{args.text_length} (video rows included); AdamW lr {LR:g} wd {WEIGHT_DECAY}; VL trainables; "
        f"Q-Former dropout off; our LLaMA layers {'as a list' if args.layer_list else 'scanned'}")
  batch = make_batch(args, v.image_size, queries)
  optimizer = make_optimizer(OptimizerConfig(init_lr=LR, min_lr=LR, warmup_lr=None, warmup_steps=0,
                                             weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], eps=EPS))
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    parts, paths = e2e.write_sources(args, video_cfg, None, workdir)
    half_parts = copy.deepcopy(parts) if args.bf16 else None
    def our_step(dtype):
      converted = e2e.convert(paths, video_cfg, None, os.path.join(workdir, dtype), dtype)
      return OurStep(load_video_llama(converted, audio=False, scan_layers=not args.layer_list), optimizer, batch)
    ours = our_step("float32")
    ours_half = our_step("bfloat16") if args.bf16 else None
    print(f"built, written and converted in {time.perf_counter() - start:.1f}s")
  ref = TorchStep(parts, batch, queries, device=args.device)
  ref_half = TorchStep(half_parts, batch, queries, torch.bfloat16, args.device) if args.bf16 else None
  flops = ours.step.flops(ours.state, ours.batch)
  targets = int((batch["labels"][:, 1:] != -100).sum())

  start = time.perf_counter()
  losses = {"ours": [ours()], "torch": [ref()]}
  compile_s = time.perf_counter() - start
  print(f"trainable: ours {ours.trainable_scalars:,} scalars, {ours.decayed} tensors decayed; torch "
        f"{ref.scalars_with_grad():,} scalars receiving gradients, {ref.decayed} tensors decayed")
  print(f"first step of each (our compile included): {compile_s:.1f}s")
  losses["ours"].append(ours())
  losses["torch"].append(ref())
  ours_frozen = ours.frozen_encoders()
  ours_frozen()
  featured = ours.from_features(optimizer)
  losses["ours from features"] = [featured(), featured()]
  record = lambda side, fn: lambda: losses[side].append(fn())  # noqa: E731
  contenders = {"ours": record("ours", ours), "torch": record("torch", ref),
                "ours frozen": ours_frozen, "torch frozen": synced(ref.frozen_encoders, args.device),
                "ours from features": record("ours from features", featured)}
  if args.bf16:
    losses["ours bf16"] = [ours_half(), ours_half()]
    losses["torch bf16"] = [ref_half(), ref_half()]
    ours_half_frozen = ours_half.frozen_encoders()
    ours_half_frozen()
    contenders |= {"ours bf16": record("ours bf16", ours_half), "torch bf16": record("torch bf16", ref_half),
                   "ours bf16 frozen": ours_half_frozen,
                   "torch bf16 frozen": synced(ref_half.frozen_encoders, args.device)}

  tokens_per_frame = (v.image_size // v.patch_size) ** 2 + 1
  gemm = (args.batch * args.frames * tokens_per_frame, v.width, v.mlp_dim)
  if not args.quick:  # at tiny widths a lone matmul measures dispatch, not a rate
    contenders |= gemm_rates(*gemm, args.bf16, args.device)
    attention_shape = (args.batch * args.frames, tokens_per_frame, v.heads, v.width // v.heads)
    contenders |= attention_calls(*attention_shape, args.device)
  times = median_times(contenders, args.repeats)
  o, t, f = (np.array(losses[k]) for k in ("ours", "torch", "ours from features"))
  rel = np.abs(o - t) / np.abs(t)
  rel_features = np.abs(f - o).max() / np.abs(o).max()
  print(f"check: loss step 1 ours {o[0]:.6f} torch {t[0]:.6f}, step 2 {o[1]:.6f} / {t[1]:.6f}; max relative "
        f"difference over all {len(o)} steps {rel.max():.1e} ({'ok' if rel.max() <= TOLERANCE else 'FAILS'} "
        f"at {TOLERANCE:g}); {targets} target tokens per step; from frozen features: {rel_features:.1e} "
        f"from ours, step by step ({'ok' if rel_features <= TOLERANCE else 'FAILS'})")
  rel_half = 0.0
  if args.bf16:
    hb, ht = np.array(losses["ours bf16"]), np.array(losses["torch bf16"])
    rel_half = max(np.abs(hb - ht).max() / np.abs(ht).max(), np.abs(hb[0] - o[0]) / np.abs(o[0]))
    print(f"check, frozen in bf16: loss step 1 ours {hb[0]:.6f} torch {ht[0]:.6f} (fp32 {o[0]:.6f}); max relative "
          f"difference {rel_half:.1e} ({'ok' if rel_half <= HALF_TOLERANCE else 'FAILS'} at {HALF_TOLERANCE:g}: "
          "the two sides round differently)")

  peak = metrics.peak_flops()
  b = args.batch
  print(f"\nmedian of {args.repeats} turns; ratio = PyTorch time / ours (> 1: ours faster)")
  rows = [("train step", times["ours"], times["torch"],
           f"samples/s: ours {b / times['ours']:.3f}, torch {b / times['torch']:.3f}; GFLOP/s at our step's "
           f"count: {flops / times['ours'] / 1e9:.1f} / {flops / times['torch'] / 1e9:.1f}"),
          ("  frozen encoders (forward)", times["ours frozen"], times["torch frozen"],
           "EVA + ln_vision + image Q-Former, timed alone"),
          ("  the rest", times["ours"] - times["ours frozen"], times["torch"] - times["torch frozen"],
           "step - frozen: video Q-Former and LLaMA forward + backward, AdamW"),
          ("ours from frozen features", times["ours from features"], times["torch"],
           "data.features_dir (augment off): the encoders run once per video, not per step; the "
           "reference has no such mode")]
  if args.bf16:
    rows += [("train step, frozen bf16", times["ours bf16"], times["torch bf16"],
              "EVA, image Q-Former and LLaMA in bf16 (as converted by default), trainables fp32, both sides"),
             ("  frozen encoders (forward)", times["ours bf16 frozen"], times["torch bf16 frozen"], "in bf16"),
             ("  the rest", times["ours bf16"] - times["ours bf16 frozen"],
              times["torch bf16"] - times["torch bf16 frozen"], "step - frozen")]
  for name, ot, tt, note in rows:
    print(f"{name:27s} ours {ot * 1e3:8.0f} ms  torch {tt * 1e3:8.0f} ms  ratio {tt / ot:5.2f}  {note}")
  peak_is = ("the measured fp32 matmul rate" if jax.default_backend() == "cpu"
             else f"the tabled peak of {jax.devices()[0].device_kind}")
  print(f"MFU (ours): {flops / times['ours'] / peak:.1%} of {peak_is}, {peak / 1e9:.1f} GFLOP/s; "
        f"{flops / 1e9:.4g} GFLOP per step (the forward and backward matmuls, every scanned layer and block "
        f"counted, as train.py's MFU counts them)")
  if not args.quick:
    gemm_flops = 2 * gemm[0] * gemm[1] * gemm[2]
    rates = {side: gemm_flops / times[f"{side} gemm"] for side in ("ours", "torch")}
    fastest = flops / max(rates.values())
    print(f"fp32 matmul {gemm[0]}x{gemm[1]} @ {gemm[1]}x{gemm[2]} alone: ours {rates['ours'] / 1e9:.1f}, torch "
          f"{rates['torch'] / 1e9:.1f} GFLOP/s; the step's {flops / 1e9:.4g} GFLOP at the faster rate take "
          f"{fastest * 1e3:.0f} ms, so no fp32 step beats PyTorch's by more than {times['torch'] / fastest:.2f}x here "
          f"(PyTorch's step runs its matmuls at {fastest / times['torch']:.0%} of that rate, ours at "
          f"{fastest / times['ours']:.0%})")
    frames, tokens, heads, head_dim = attention_shape
    print(f"EVA attention alone, fp32 ({frames} frames x {heads} heads x {tokens} tokens x {head_dim}): ours "
          f"{times['ours attention'] * 1e3:.0f} ms, torch {times['torch attention'] * 1e3:.0f} ms (its fused SDPA kernel); "
          f"{4 * frames * heads * tokens ** 2 * head_dim / 1e9:.1f} GFLOP, once per EVA block in the step's forward")
    if args.bf16:
      half = {side: gemm_flops / times[f"{side} gemm bf16"] for side in ("ours", "torch")}
      verdict = (f"PyTorch's {half['torch'] / half['ours']:.1f}x faster: this caps the bf16 rows"
                 if half["torch"] > half["ours"] else "ours no slower: the bf16 rows' gap lies elsewhere")
      print(f"bf16 matmul, the same shape: ours {half['ours'] / 1e9:.1f}, torch {half['torch'] / 1e9:.1f} GFLOP/s "
            f"({verdict})")
  ratio = times["torch"] / times["ours"]
  print(f"target: ours >= 1.5x the PyTorch step: {ratio:.2f}x ({'met' if ratio >= 1.5 else 'not met'})")
  print(f"  with frozen features: {times['torch'] / times['ours from features']:.2f}x (not like for like)")
  if args.bf16:
    print(f"  with the frozen weights in bf16 on both sides: {times['torch bf16'] / times['ours bf16']:.2f}x")
  elif args.device.type == "cuda" or cpu_has_bf16_units():
    print("  (no bf16 rows: --no-bf16)")
  else:
    print("  (no bf16 rows: this CPU has no bf16 units; --bf16 adds them)")
  return 0 if max(rel.max(), rel_features) <= TOLERANCE and rel_half <= HALF_TOLERANCE else 1


if __name__ == "__main__":
  sys.exit(main())
