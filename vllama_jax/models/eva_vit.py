"""EVA ViT-g/14, the frozen image encoder of BLIP-2 / Video-LLaMA, in Flax NNX, with `ln_vision`.

Architecture as in LAVIS `eva_vit.py` with `create_eva_vit_g` (39 of EVA-CLIP's 40 blocks): a 14×14
patch embedding, a CLS token, learned absolute positions, pre-LN blocks whose fused qkv projection
has biases for q and v only, exact-GELU MLPs, no layer scale, no relative position bias and no final
norm. BLIP-2's `ln_vision` LayerNorm (eps 1e-5, fp32) follows. All 1 + N tokens are returned.

Blocks are stacked along a leading `layers` axis and run with `jax.lax.scan`, so the 39 blocks
compile once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vllama_jax.config import DTYPES
from vllama_jax.errors import ConfigError
from vllama_jax.layers.activations import gelu
from vllama_jax.layers.attention import dot_product_attention
from vllama_jax.layers.linear import Linear, param
from vllama_jax.layers.norms import LayerNorm
from vllama_jax.layers.stack import stacked
from vllama_jax.sharding import abstract_model, constrain

HIDDEN = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class EvaVitConfig:
  """Defaults are EVA ViT-g/14 as BLIP-2 uses it (`EvaVitConfig.vit_g()`)."""
  image_size: int = 224
  patch_size: int = 14
  width: int = 1408
  depth: int = 39
  heads: int = 16
  mlp_dim: int = 6144
  layer_norm_eps: float = 1e-6
  ln_vision_eps: float = 1e-5
  # Runtime choices, not architecture.
  dtype: str = "bfloat16"
  remat: bool = False

  def __post_init__(self):
    if self.width % self.heads:
      raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
    if self.image_size % self.patch_size:
      raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"dtype {self.dtype!r} is not one of {DTYPES}")

  @classmethod
  def vit_g(cls, **runtime: Any) -> "EvaVitConfig":
    return cls(**runtime)

  @classmethod
  def tiny(cls, **changes: Any) -> "EvaVitConfig":
    """A two-block model for tests: 2×2 patches of 14 pixels, width 64."""
    return cls(**({"image_size": 28, "width": 64, "depth": 2, "heads": 4, "mlp_dim": 172} | changes))

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def grid(self) -> int:
    """Patches per side of the position table (16 for 224 / 14)."""
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return 1 + self.grid ** 2

  def replace(self, **changes: Any) -> "EvaVitConfig":
    return dataclasses.replace(self, **changes)


class PatchEmbed(nnx.Module):
  """Conv2d(3, width, patch, stride=patch) with bias, as a reshape into patches and one einsum.

  `kernel` is (patch_h, patch_w, channels, width): torch's Conv2d weight (O, I, kh, kw) transposed
  by (2, 3, 1, 0). Tokens come out row-major over the (h, w) grid, like torch's `flatten(2)`.
  """

  def __init__(self, cfg: EvaVitConfig, *, rngs: nnx.Rngs):
    p = cfg.patch_size
    self.patch_size = p
    self.kernel = param(rngs, nnx.initializers.normal(0.02), (p, p, 3, cfg.width), cfg.dtype,
                        ("patch", "patch", "patch", "embed"))
    self.bias = param(rngs, nnx.initializers.zeros, (cfg.width,), cfg.dtype, ("embed",))

  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """pixels (B, H, W, 3) -> tokens (B, gh * gw, width) and the grid (gh, gw).

    Like the strided convolution, trailing rows/columns that do not fill a patch are dropped.
    """
    b, h, w, c = pixels.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    kernel = self.kernel[...]
    patches = pixels[:, :gh * p, :gw * p].astype(kernel.dtype).reshape(b, gh, p, gw, p, c)
    tokens = jnp.einsum("bhywxc,yxco->bhwo", patches, kernel, preferred_element_type=jnp.float32) + self.bias[...]
    return tokens.astype(kernel.dtype).reshape(b, gh * gw, -1), (gh, gw)


class EvaAttention(nnx.Module):
  """LAVIS's fused qkv (bias = concat(q_bias, 0, v_bias)) kept as three projections; k has no bias."""

  def __init__(self, cfg: EvaVitConfig, *, rngs: nnx.Rngs):
    dense = lambda i, o, names, bias: Linear(i, o, names=names, use_bias=bias, dtype=cfg.dtype, rngs=rngs)
    self.q = dense(cfg.width, cfg.width, ("embed", "heads"), True)
    self.k = dense(cfg.width, cfg.width, ("embed", "heads"), False)
    self.v = dense(cfg.width, cfg.width, ("embed", "heads"), True)
    self.proj = dense(cfg.width, cfg.width, ("heads", "embed"), True)
    self.heads, self.head_dim = cfg.heads, cfg.head_dim

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.heads, self.head_dim)
    q = constrain(split(self.q(x)), ("batch", "length", "act_heads", None))
    out = dot_product_attention(q, split(self.k(x)), split(self.v(x)), None, scale=self.head_dim ** -0.5)
    return self.proj(out.reshape(b, t, -1))


class EvaMlp(nnx.Module):

  def __init__(self, cfg: EvaVitConfig, *, rngs: nnx.Rngs):
    self.fc1 = Linear(cfg.width, cfg.mlp_dim, names=("embed", "mlp"), use_bias=True, dtype=cfg.dtype, rngs=rngs)
    self.fc2 = Linear(cfg.mlp_dim, cfg.width, names=("mlp", "embed"), use_bias=True, dtype=cfg.dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = gelu(self.fc1(x))
    return self.fc2(constrain(hidden, ("batch", "length", "act_mlp")))


class EvaBlock(nnx.Module):
  """Pre-LN: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, cfg: EvaVitConfig, *, rngs: nnx.Rngs):
    norm = lambda: LayerNorm(cfg.width, eps=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.norm1 = norm()
    self.attn = EvaAttention(cfg, rngs=rngs)
    self.norm2 = norm()
    self.mlp = EvaMlp(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    x = x + self.mlp(self.norm2(x))
    return constrain(x, HIDDEN)


class EvaVisionTransformer(nnx.Module):
  """Pixels (B, H, W, 3), CLIP-normalised, NHWC -> `ln_vision` features (B, 1 + gh * gw, width)."""

  def __init__(self, cfg: EvaVitConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.cls_token = param(rngs, nnx.initializers.normal(0.02), (cfg.width,), cfg.dtype, ("embed",))
    self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (cfg.num_positions, cfg.width), cfg.dtype,
                           ("positions", "embed"))
    self.blocks = stacked(lambda r: EvaBlock(cfg, rngs=r), cfg.depth, rngs)
    self.ln_vision = LayerNorm(cfg.width, eps=cfg.ln_vision_eps, dtype=cfg.dtype, rngs=rngs)

  @property
  def dtype(self):
    return jnp.dtype(self.config.dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    x = self.encode(pixels)
    # BLIP-2's fp16-safe LayerNorm: computed on an fp32 copy, cast back to the activation dtype.
    return self.ln_vision(x.astype(jnp.float32)).astype(x.dtype)

  def encode(self, pixels: jax.Array) -> jax.Array:
    """The ViT alone (what LAVIS's `visual_encoder` returns): embeddings and all blocks, no norm."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
      raise ValueError(f"expected pixels of shape (batch, height, width, 3), got {pixels.shape}")
    tokens, grid = self.patch_embed(pixels)
    cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
    x = jnp.concatenate([cls, tokens], axis=1) + self.position_embeddings(grid).astype(tokens.dtype)
    return self._run_blocks(constrain(x, HIDDEN))

  def position_embeddings(self, grid: tuple[int, int]) -> jax.Array:
    """(1 + gh * gw, width): the table itself at its own grid, else its patch rows resized bicubically."""
    table = self.pos_embed[...]
    side = self.config.grid
    if tuple(grid) == (side, side):
      return table
    patch_rows = table[1:].reshape(side, side, -1)
    return jnp.concatenate([table[:1], resize_bicubic(patch_rows, grid).reshape(-1, table.shape[-1])])

  def _run_blocks(self, x: jax.Array) -> jax.Array:
    graphdef, block_states = nnx.split(self.blocks)

    def body(h, block_state):
      return nnx.merge(graphdef, block_state)(h), None

    if self.config.remat:
      body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, x, block_states)
    return x


# ---- position-table resizing ------------------------------------------------------------------

def resize_bicubic(image: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(h, w, C) -> (size[0], size[1], C), exactly as torch's
  `F.interpolate(mode="bicubic", align_corners=False)`, which LAVIS's `interpolate_pos_embed` and
  transformers' `interpolate_pos_encoding` use.

  Not `jax.image.resize(method="cubic")`: that uses the Keys kernel with a = -0.5 (torch: -0.75),
  antialiases when shrinking, and renormalises weights at the border where torch clamps indices, so
  its tables differ from the reference's by a few percent. The resize is separable, so it is two
  small (out, in) weight matrices built here with numpy from the static shapes.
  """
  rows = jnp.asarray(_bicubic_weights(image.shape[0], size[0]))
  cols = jnp.asarray(_bicubic_weights(image.shape[1], size[1]))
  out = jnp.einsum("Hh,Ww,hwc->HWc", rows, cols, image.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(image.dtype)


def _bicubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """(out_size, in_size) float32 matrix of torch's bicubic (align_corners=False, edge-clamped) resize."""
  weights = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    source = (i + 0.5) * scale - 0.5  # not clamped at 0 for cubic, as in torch
    base = math.floor(source)
    t = source - base
    taps = (_cubic_outer(t + 1, a), _cubic_inner(t, a), _cubic_inner(1 - t, a), _cubic_outer(2 - t, a))
    for offset, tap in zip(range(-1, 3), taps):
      weights[i, min(max(base + offset, 0), in_size - 1)] += tap
  return weights.astype(np.float32)


def _cubic_inner(x: float, a: float) -> float:  # |x| <= 1
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_outer(x: float, a: float) -> float:  # 1 < |x| < 2
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def parameter_count(cfg: EvaVitConfig, include_ln_vision: bool = True) -> int:
  """Number of parameters, from abstract shapes (nothing is allocated)."""
  _, state = abstract_model(lambda: EvaVisionTransformer(cfg, rngs=nnx.Rngs(0)))
  pure = nnx.to_pure_dict(state)
  if not include_ln_vision:
    pure.pop("ln_vision")
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(pure))
