"""CPU benchmark: encoding 8-frame videos with our vision branch vs the PyTorch references.

ViT (EVA, as transformers' Blip2VisionModel) + ln_vision + image Q-Former + frame positions + video
Q-Former + llama_proj (as Blip2QFormerModel and torch glue), the same random weights on both sides
(ours through our converters), timed in turns in one run. Prints PyTorch/JAX time ratios (> 1: JAX
faster) and the GFLOP/s each side reaches against this machine's measured fp32 matmul peak.

  python bench/vision.py                 # ViT-g width at depth 4, real Q-Formers, 1 video x 8 frames
  python bench/vision.py --quick         # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vllama_jax.torch_compat import install_torchvision_shim  # noqa: E402

install_torchvision_shim()  # before transformers imports a model (and with it torchvision)
from flax import nnx  # noqa: E402

from vllama_jax import sharding  # noqa: E402
from vllama_jax.convert.eva import eva_vit_params  # noqa: E402
from vllama_jax.convert.qformer import IMAGE_KEYS, VIDEO_KEYS, convert_qformer  # noqa: E402
from vllama_jax.models.eva_vit import EvaVitConfig  # noqa: E402
from vllama_jax.models.qformer import QFormerConfig  # noqa: E402
from vllama_jax.models.video_branch import VideoBranch, VideoBranchConfig  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--depth", type=int, default=4, help="ViT blocks (the release uses 39)")
  p.add_argument("--videos", type=int, default=1)
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--llm-hidden", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--quick", action="store_true")
  return p.parse_args(argv)


def config(args) -> VideoBranchConfig:
  if args.quick:
    return VideoBranchConfig.tiny()
  return VideoBranchConfig(vit=EvaVitConfig.vit_g(depth=args.depth, dtype="float32"),
                           image_qformer=QFormerConfig.image(), video_qformer=QFormerConfig.video(),
                           llm_hidden_size=args.llm_hidden)


# ---- the PyTorch side -------------------------------------------------------------------------

def torch_branch(cfg: VideoBranchConfig):
  from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel
  torch.manual_seed(0)
  v = cfg.vit
  vision = Blip2VisionModel(Blip2VisionConfig(
      hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.heads,
      image_size=v.image_size, patch_size=v.patch_size, qkv_bias=True, layer_norm_eps=v.layer_norm_eps,
      hidden_act="gelu")).eval()
  vision.post_layernorm.eps = v.ln_vision_eps
  with torch.no_grad():
    for layer in vision.encoder.layers:
      layer.self_attn.qkv.bias[v.width:2 * v.width] = 0  # EVA has no k bias

  def qformer(q: QFormerConfig):
    return Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=q.hidden_size, num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size,
        num_hidden_layers=q.num_layers, cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=q.encoder_width, use_qformer_text_input=False, hidden_act="gelu")).eval()

  modules = dict(vision=vision, image_qformer=qformer(cfg.image_qformer), video_qformer=qformer(cfg.video_qformer),
                 image_tokens=torch.randn(1, cfg.image_qformer.num_query_tokens, cfg.image_qformer.hidden_size) * 0.02,
                 video_tokens=torch.randn(1, cfg.video_qformer.num_query_tokens, cfg.video_qformer.hidden_size) * 0.02,
                 frame_positions=torch.randn(cfg.max_frames, cfg.image_qformer.hidden_size),
                 llama_proj=torch.nn.Linear(cfg.image_qformer.hidden_size, cfg.llm_hidden_size))
  return modules


def torch_forward(m, frames):  # (B, T, 3, H, W)
  b, t = frames.shape[:2]
  embeds = m["vision"](pixel_values=frames.flatten(0, 1)).last_hidden_state
  queries = m["image_qformer"](query_embeds=m["image_tokens"].expand(b * t, -1, -1),
                               encoder_hidden_states=embeds).last_hidden_state
  queries = queries.reshape(b, t, queries.shape[1], -1) + m["frame_positions"][:t][None, :, None, :]
  video = m["video_qformer"](query_embeds=m["video_tokens"].expand(b, -1, -1),
                             encoder_hidden_states=queries.reshape(b, -1, queries.shape[-1])).last_hidden_state
  return m["llama_proj"](video)


# ---- our side, through our converters ---------------------------------------------------------

def lavis_vision(vision, width) -> dict:
  renames = [(r"embeddings\.class_embedding", "cls_token"), (r"embeddings\.position_embedding", "pos_embed"),
             (r"embeddings\.patch_embedding\.", "patch_embed.proj."), (r"encoder\.layers\.", "blocks."),
             (r"\.layer_norm(\d)\.", r".norm\1."), (r"\.self_attn\.projection\.", ".attn.proj."),
             (r"\.self_attn\.qkv\.", ".attn.qkv."), (r"post_layernorm\.", "ln_vision.")]
  out = {}
  for key, value in vision.state_dict().items():
    for pattern, replacement in renames:
      key = re.sub(pattern, replacement, key)
    value = value.numpy()
    if key.endswith("attn.qkv.bias"):
      out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = value[:width], value[2 * width:]
    else:
      out[key] = value
  return out


def lavis_qformer(model, tokens, keys):
  prefix, query_key = keys
  triples = [("bench", query_key, tokens.numpy())]
  for name, value in model.state_dict().items():
    name = ("bert.embeddings.LayerNorm." + name[len("layernorm."):] if name.startswith("layernorm.")
            else "bert." + name)
    name = name.replace(".attention.attention.", ".attention.self.").replace(
        ".crossattention.attention.", ".crossattention.self.")
    triples.append(("bench", prefix + name, value.numpy()))
  return triples


def jax_branch(cfg, m) -> VideoBranch:
  params = {
      "visual_encoder": eva_vit_params(cfg.vit, (("bench", k, v) for k, v in lavis_vision(m["vision"], cfg.vit.width).items())),
      "qformer": convert_qformer(cfg.image_qformer, lavis_qformer(m["image_qformer"], m["image_tokens"], IMAGE_KEYS), *IMAGE_KEYS),
      "video_qformer": convert_qformer(cfg.video_qformer, lavis_qformer(m["video_qformer"], m["video_tokens"], VIDEO_KEYS), *VIDEO_KEYS),
      "frame_position_embedding": m["frame_positions"].numpy(),
      "llama_proj": {"kernel": m["llama_proj"].weight.detach().numpy().T, "bias": m["llama_proj"].bias.detach().numpy()},
  }
  graphdef, state = sharding.abstract_model(lambda: VideoBranch(cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


# ---- FLOPs and timing -------------------------------------------------------------------------

def branch_flops(cfg: VideoBranchConfig, videos: int, frames: int) -> float:
  """Multiply-adds x 2 of the matmuls (attention included; norms, softmax, GELU ignored)."""
  v = cfg.vit
  n = (v.image_size // v.patch_size) ** 2 + 1
  vit = v.depth * (2 * n * v.width * 4 * v.width + 4 * n * n * v.width + 4 * n * v.width * v.mlp_dim)
  vit += 2 * (n - 1) * 3 * v.patch_size ** 2 * v.width

  def qformer(q: QFormerConfig, keys: int) -> float:
    nq, h = q.num_query_tokens, q.hidden_size
    total = 0.0
    for i in range(q.num_layers):
      total += 2 * nq * h * 4 * h + 4 * nq * nq * h + 4 * nq * h * q.intermediate_size
      if q.has_cross_attention(i):
        total += 2 * nq * h * 2 * h + 2 * keys * q.encoder_width * 2 * h + 4 * nq * keys * h
    return total

  per_frame = vit + qformer(cfg.image_qformer, n)
  video_keys = frames * cfg.image_qformer.num_query_tokens
  per_video = frames * per_frame + qformer(cfg.video_qformer, video_keys)
  per_video += 2 * cfg.video_qformer.num_query_tokens * cfg.video_qformer.hidden_size * cfg.llm_hidden_size
  return videos * per_video


def matmul_peak() -> float:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048), np.float32))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 2 * 2048 ** 3 * 5 / (time.perf_counter() - start) / 1e9


def main(argv=None) -> int:
  args = parse_args(argv)
  cfg = config(args)
  print(f"jax {jax.__version__} {jax.devices()}; torch {torch.__version__} threads {torch.get_num_threads()}")
  print(f"config: ViT width {cfg.vit.width} depth {cfg.vit.depth} image {cfg.vit.image_size}; image Q-Former "
        f"{cfg.image_qformer.num_layers} layers; video Q-Former {cfg.video_qformer.num_layers} layers; "
        f"{args.videos} video(s) x {args.frames} frames; fp32")
  m = torch_branch(cfg)
  ours = jax_branch(cfg, m)
  size = cfg.vit.image_size
  frames = np.random.default_rng(0).standard_normal((args.videos, args.frames, size, size, 3), np.float32)
  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  x = jnp.asarray(frames)
  start = time.perf_counter()
  got = np.asarray(forward(state, x))
  print(f"JAX compile + first run {time.perf_counter() - start:.2f}s")
  t_frames = torch.from_numpy(frames.transpose(0, 1, 4, 2, 3).copy())
  with torch.inference_mode():
    expected = torch_forward(m, t_frames).numpy()
    print(f"max |diff| {np.abs(got - expected).max():.2e} (max |out| {np.abs(expected).max():.2e})")
    times = {"jax": [], "torch": []}
    for _ in range(args.repeats):
      start = time.perf_counter()
      forward(state, x).block_until_ready()
      times["jax"].append(time.perf_counter() - start)
      start = time.perf_counter()
      torch_forward(m, t_frames)
      times["torch"].append(time.perf_counter() - start)
  j, t = statistics.median(times["jax"]), statistics.median(times["torch"])
  gflop = branch_flops(cfg, args.videos, args.frames) / 1e9
  peak = matmul_peak()
  print(f"\n{'':22}{'JAX':>10}{'PyTorch':>10}")
  print(f"{'time (ms)':22}{j * 1e3:10.1f}{t * 1e3:10.1f}")
  print(f"{'GFLOP/s':22}{gflop / j:10.1f}{gflop / t:10.1f}")
  print(f"{'% of matmul peak':22}{100 * gflop / j / peak:10.1f}{100 * gflop / t / peak:10.1f}")
  print(f"ratio PyTorch/JAX {t / j:.2f}; {gflop:.1f} GFLOP per call; measured fp32 matmul peak {peak:.0f} GFLOP/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
