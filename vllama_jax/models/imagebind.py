"""ImageBind-Huge's audio and vision encoders (as Video-LLaMA uses them) in Flax NNX.

One module family, `ImageBindEncoder`, configured per modality by `ImageBindConfig`:

* audio (`ImageBindConfig.audio()`): (B, S, 1, 128, 204) log-mel filterbanks, the S clips folded into
  the batch. An overlapping Conv2d stem (kernel 16, stride 10, no bias) gives a 12 x 19 grid, i.e.
  228 tokens ordered mel-major like torch's `flatten(2)`, then a LayerNorm (eps 1e-5); a CLS token
  and a learned position table (229 rows). 12 pre-LN blocks (768 wide, 12 heads, MLP 3072, exact
  GELU) whose attention is `nn.MultiheadAttention(add_bias_kv=True)`: a learned key and value row is
  appended after the in-projection, so every query sees 1 + 228 + 1 keys. Drop path linspace(0, 0.1)
  in training only. Head: LayerNorm (eps 1e-6), CLS token, Linear(768 -> 1024, no bias). Post:
  L2-normalise, times min(exp(log_logit_scale), 100) = 20 (a frozen checkpoint buffer). Output
  (B, S, 1024), one vector per clip (no averaging over clips: Video-LLaMA's audio Q-Former wants
  them all).
* vision (`ImageBindConfig.vision()`): (B, T, 3, 224, 224) frames, each encoded on its own. ImageBind
  pads an image into a two-frame video by repetition and applies a Conv3d with kernel = stride =
  (2, 14, 14); on two equal frames that is exactly a Conv2d (stride 14) with the kernel summed over
  its time axis, which the converter does once (`convert/imagebind.py`). CLS + learned positions
  (257 rows), a pre-transformer LayerNorm (eps 1e-6), 32 blocks (1280 wide, 16 heads, MLP 5120, no
  bias_kv, no drop path), head LayerNorm + CLS + Linear(1280 -> 1024, no bias), L2-normalise only.
  Output (B, T, 1024).

Inputs are channel-first as in ImageBind, (B, S, C, H, W); they are moved to NHWC internally. The
input size must equal the config's (the position table is not interpolated). Parameters are kept in
`cfg.dtype`; LayerNorm statistics, softmax and the final normalisation are in float32, and the
output is float32. Blocks are stacked along a `layers` axis and run with `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
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
MODALITIES = ("audio", "vision")
MAX_LOGIT_SCALE = 100.0  # ImageBind's LearnableLogitScaling clips exp(log_logit_scale) here


class Buffer(nnx.Variable):
  """A frozen, non-trainable value read from the checkpoint (ImageBind's `log_logit_scale`)."""


@dataclasses.dataclass(frozen=True)
class ImageBindConfig:
  """Defaults are ImageBind-Huge's audio encoder; `ImageBindConfig.vision()` gives its vision encoder."""
  modality: str = "audio"
  in_channels: int = 1
  input_size: tuple[int, int] = (128, 204)  # (mel bins, frames) for audio; (H, W) for vision
  kernel_size: int = 16
  stride: int = 10
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  out_dim: int = 1024
  stem_norm: bool = True  # LayerNorm after the stem (audio)
  stem_norm_eps: float = 1e-5
  pre_norm: bool = False  # LayerNorm before the blocks (vision)
  bias_kv: bool = True  # nn.MultiheadAttention(add_bias_kv=True) (audio)
  drop_path: float = 0.1  # largest stochastic-depth rate; linspace(0, drop_path, depth), training only
  logit_scale: bool = True  # multiply by min(exp(log_logit_scale), 100) after normalising (audio)
  logit_scale_init: float = 20.0
  layer_norm_eps: float = 1e-6
  # Runtime choices, not architecture.
  dtype: str = "bfloat16"
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "input_size", tuple(self.input_size))
    if self.modality not in MODALITIES:
      raise ConfigError(f"modality {self.modality!r} is not one of {MODALITIES}")
    if self.width % self.heads:
      raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
    if any(s < self.kernel_size for s in self.input_size):
      raise ConfigError(f"input_size {self.input_size} is smaller than kernel_size {self.kernel_size}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"dtype {self.dtype!r} is not one of {DTYPES}")
    if not 0.0 <= self.drop_path < 1.0:
      raise ConfigError(f"drop_path {self.drop_path} must be in [0, 1)")

  @classmethod
  def audio(cls, **changes: Any) -> "ImageBindConfig":
    """ImageBind-Huge's audio encoder."""
    return cls(**changes)

  @classmethod
  def vision(cls, **changes: Any) -> "ImageBindConfig":
    """ImageBind-Huge's vision encoder (ViT-H/14)."""
    return cls(**(dict(modality="vision", in_channels=3, input_size=(224, 224), kernel_size=14, stride=14,
                       width=1280, depth=32, heads=16, mlp_dim=5120, stem_norm=False, pre_norm=True,
                       bias_kv=False, drop_path=0.0, logit_scale=False) | changes))

  @classmethod
  def tiny_audio(cls, **changes: Any) -> "ImageBindConfig":
    """Two blocks, width 48, a 32 x 44 input with overlapping 8 x 8 patches (stride 6): a 5 x 7 grid."""
    return cls.audio(**(dict(input_size=(32, 44), kernel_size=8, stride=6, width=48, depth=2, heads=4,
                             mlp_dim=192, out_dim=32) | changes))

  @classmethod
  def tiny_vision(cls, **changes: Any) -> "ImageBindConfig":
    """Two blocks, width 64, 224 x 224 frames in 56-pixel patches: a 4 x 4 grid."""
    return cls.vision(**(dict(kernel_size=56, stride=56, width=64, depth=2, heads=4, mlp_dim=256,
                              out_dim=32) | changes))

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def grid(self) -> tuple[int, int]:
    """The stem's output grid: (12, 19) for audio, (16, 16) for vision."""
    return tuple((s - self.kernel_size) // self.stride + 1 for s in self.input_size)

  @property
  def num_positions(self) -> int:
    return 1 + math.prod(self.grid)

  def drop_path_rates(self) -> list[float]:
    """Per-block stochastic-depth rates, as `torch.linspace(0, drop_path, depth)`."""
    if self.depth == 1:
      return [0.0]
    return [self.drop_path * i / (self.depth - 1) for i in range(self.depth)]

  def replace(self, **changes: Any) -> "ImageBindConfig":
    return dataclasses.replace(self, **changes)


class Stem(nnx.Module):
  """Conv2d(in_channels, width, kernel, stride, no bias) as `lax.conv_general_dilated` in NHWC.

  `kernel` is (kh, kw, in, width): torch's (O, I, kh, kw) transposed by (2, 3, 1, 0) (for vision, after
  folding the Conv3d's time axis). Tokens come out row-major over the grid, like torch's `flatten(2)`.
  """

  def __init__(self, cfg: ImageBindConfig, *, rngs: nnx.Rngs):
    k = cfg.kernel_size
    self.stride = cfg.stride
    self.kernel = param(rngs, nnx.initializers.normal(0.02), (k, k, cfg.in_channels, cfg.width), cfg.dtype,
                        ("patch", "patch", "patch", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (N, H, W, C) -> (N, gh * gw, width)."""
    kernel = self.kernel[...]
    y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, (self.stride, self.stride), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32).astype(kernel.dtype)
    return y.reshape(y.shape[0], -1, y.shape[-1])


class ImageBindAttention(nnx.Module):
  """nn.MultiheadAttention (in_proj split into q, k, v; out_proj), optionally with add_bias_kv."""

  def __init__(self, cfg: ImageBindConfig, *, rngs: nnx.Rngs):
    dense = lambda names: Linear(cfg.width, cfg.width, names=names, use_bias=True, dtype=cfg.dtype, rngs=rngs)
    self.q = dense(("embed", "heads"))
    self.k = dense(("embed", "heads"))
    self.v = dense(("embed", "heads"))
    self.out = dense(("heads", "embed"))
    if cfg.bias_kv:  # torch: xavier_normal_ on (1, 1, width)
      self.bias_k = param(rngs, nnx.initializers.normal(0.02), (cfg.width,), cfg.dtype, ("heads",))
      self.bias_v = param(rngs, nnx.initializers.normal(0.02), (cfg.width,), cfg.dtype, ("heads",))
    else:
      self.bias_k = self.bias_v = None
    self.heads, self.head_dim = cfg.heads, cfg.head_dim

  def __call__(self, x: jax.Array, queries: int | None = None) -> jax.Array:
    """x (B, T, width) -> (B, T, width), or only the first `queries` rows (keys are all of x)."""
    b = x.shape[0]
    split = lambda y: y.reshape(b, -1, self.heads, self.head_dim)
    q = constrain(split(self.q(x[:, :queries])), ("batch", "length", "act_heads", None))
    t = q.shape[1]
    k, v = split(self.k(x)), split(self.v(x))
    if self.bias_k is not None:  # one extra key / value position, appended after the in-projection
      extra = lambda p, like: jnp.broadcast_to(p[...].astype(like.dtype).reshape(1, 1, self.heads, self.head_dim),
                                               (b, 1, self.heads, self.head_dim))
      k = jnp.concatenate([k, extra(self.bias_k, k)], axis=1)
      v = jnp.concatenate([v, extra(self.bias_v, v)], axis=1)
    out = dot_product_attention(q, k, v, None, scale=self.head_dim ** -0.5)
    return self.out(out.reshape(b, t, -1))


class ImageBindMlp(nnx.Module):

  def __init__(self, cfg: ImageBindConfig, *, rngs: nnx.Rngs):
    self.fc1 = Linear(cfg.width, cfg.mlp_dim, names=("embed", "mlp"), use_bias=True, dtype=cfg.dtype, rngs=rngs)
    self.fc2 = Linear(cfg.mlp_dim, cfg.width, names=("mlp", "embed"), use_bias=True, dtype=cfg.dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = gelu(self.fc1(x))
    return self.fc2(constrain(hidden, ("batch", "length", "act_mlp")))


def _drop_path(x: jax.Array, rate: jax.Array, key: jax.Array | None) -> jax.Array:
  """timm's DropPath (scale_by_keep): each sample's branch is zeroed with probability `rate`, else / (1 - rate)."""
  if key is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class ImageBindBlock(nnx.Module):
  """Pre-LN: x + drop_path(attn(norm_1(x))), then x + drop_path(mlp(norm_2(x))); no layer scale."""

  def __init__(self, cfg: ImageBindConfig, *, rngs: nnx.Rngs):
    norm = lambda: LayerNorm(cfg.width, eps=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.norm_1 = norm()
    self.attn = ImageBindAttention(cfg, rngs=rngs)
    self.norm_2 = norm()
    self.mlp = ImageBindMlp(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, rate: jax.Array | None = None, key: jax.Array | None = None,
               queries: int | None = None) -> jax.Array:
    """`queries`: compute only the first rows' outputs (all rows still serve as keys and values)."""
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    x = x[:, :queries] + _drop_path(self.attn(self.norm_1(x), queries), rate, keys[0])
    x = x + _drop_path(self.mlp(self.norm_2(x)), rate, keys[1])
    return constrain(x, HIDDEN)


class ImageBindEncoder(nnx.Module):
  """(B, S, C, H, W) clips or frames -> (B, S, out_dim) float32 embeddings (see the module docstring)."""

  def __init__(self, cfg: ImageBindConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    w = cfg.width
    self.stem = Stem(cfg, rngs=rngs)
    self.stem_norm = LayerNorm(w, eps=cfg.stem_norm_eps, dtype=cfg.dtype, rngs=rngs) if cfg.stem_norm else None
    self.cls_token = param(rngs, nnx.initializers.normal(w ** -0.5), (w,), cfg.dtype, ("embed",))
    self.pos_embed = param(rngs, nnx.initializers.normal(w ** -0.5), (cfg.num_positions, w), cfg.dtype,
                           ("positions", "embed"))
    self.pre_norm = LayerNorm(w, eps=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs) if cfg.pre_norm else None
    self.blocks = stacked(lambda r: ImageBindBlock(cfg, rngs=r), cfg.depth, rngs)
    self.head_norm = LayerNorm(w, eps=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.head = Linear(w, cfg.out_dim, names=("embed", None), dtype=cfg.dtype, rngs=rngs)
    if cfg.logit_scale:  # a buffer, kept in float32 whatever cfg.dtype is
      self.log_logit_scale = Buffer(jnp.asarray(math.log(cfg.logit_scale_init), jnp.float32),
                                    out_sharding=(), eager_sharding=False)
    else:
      self.log_logit_scale = None

  @property
  def dtype(self):
    return jnp.dtype(self.config.dtype)

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """inputs (B, S, C, H, W) -> (B, S, out_dim). Training (deterministic=False) needs `rngs` with a
    `dropout` stream when the config has drop path."""
    cfg = self.config
    expected = (cfg.in_channels, *cfg.input_size)
    if inputs.ndim != 5 or tuple(inputs.shape[2:]) != expected:
      raise ValueError(f"expected {cfg.modality} input of shape (batch, clips, {', '.join(map(str, expected))}), "
                       f"got {inputs.shape}")
    b, s = inputs.shape[:2]
    out = self.encode_clips(inputs.reshape(b * s, *expected), deterministic=deterministic, rngs=rngs)
    return out.reshape(b, s, -1)

  def encode_clips(self, x: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """x (N, C, H, W) -> (N, out_dim): ImageBind's preprocessor, trunk, head and postprocessor."""
    tokens = self.stem(jnp.transpose(x, (0, 2, 3, 1)))
    if self.stem_norm is not None:
      tokens = self.stem_norm(tokens)
    cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
    h = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...].astype(tokens.dtype)
    if self.pre_norm is not None:
      h = self.pre_norm(h)
    key = None
    if not deterministic and self.config.drop_path > 0:
      if rngs is None:
        raise ValueError("training with drop path needs rngs with a 'dropout' stream")
      key = rngs.dropout()
    h = self._run_blocks(constrain(h, HIDDEN), key)
    pooled = self.head_norm(h[:, 0])
    out = self.head(pooled).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(out), axis=-1, keepdims=True))
    out = out / jnp.maximum(norm, 1e-12)  # torch.nn.functional.normalize
    if self.log_logit_scale is not None:
      out = out * jnp.minimum(jnp.exp(self.log_logit_scale[...].astype(jnp.float32)), MAX_LOGIT_SCALE)
    return out

  def _run_blocks(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    graphdef, block_states = nnx.split(self.blocks)
    depth = self.config.depth
    rates = jnp.asarray(self.config.drop_path_rates(), jnp.float32)
    keys = jax.random.split(key, depth) if key is not None else None

    def body(h, xs):
      block_state, rate, layer_key = xs
      return nnx.merge(graphdef, block_state)(h, rate, layer_key), None

    if self.config.remat:
      body = jax.checkpoint(body)
    # Only the CLS row of the last block reaches the head: that block computes it alone (the same
    # numbers, a depth-th of the trunk's work saved).
    leading = jax.tree.map(lambda a: a[:-1], (block_states, rates, keys))
    final_state, final_rate, final_key = jax.tree.map(lambda a: a[-1], (block_states, rates, keys))
    x, _ = jax.lax.scan(body, x, leading)
    return nnx.merge(graphdef, final_state)(x, final_rate, final_key, queries=1)


def parameter_count(cfg: ImageBindConfig) -> int:
  """Number of parameters (and buffers), from abstract shapes (nothing is allocated)."""
  _, state = abstract_model(lambda: ImageBindEncoder(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.to_pure_dict(state)))
