"""Video-LLaMA's vision-language branch: frames -> 32 (video) or 32 (image) LLM-width tokens.

  frames (B, T, H, W, 3), CLIP-normalised
    -> EVA ViT-g + ln_vision, per frame           (B·T, 257, 1408)   frozen
    -> BLIP-2 image Q-Former, per frame           (B·T, 32, 768)     frozen
    -> + frame position embedding row t           (B, T, 32, 768)    trainable
    -> flatten frames and queries                 (B, T·32, 768)
    -> video Q-Former with its own query tokens   (B, 32, 768)       trainable
    -> llama_proj                                 (B, 32, H_llm)     trainable

An image is a video with T = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vllama_jax.errors import ConfigError
from vllama_jax.layers.linear import Linear, param
from vllama_jax.models.eva_vit import EvaVisionTransformer, EvaVitConfig
from vllama_jax.models.qformer import QFormer, QFormerConfig


@dataclasses.dataclass(frozen=True)
class VideoBranchConfig:
  vit: EvaVitConfig
  image_qformer: QFormerConfig
  video_qformer: QFormerConfig
  llm_hidden_size: int
  max_frames: int = 32  # rows of the frame position table
  # T > max_frames is an error unless this is set; then the table is linearly resampled to T rows,
  # corners aligned: frame 0 keeps row 0, frame T-1 gets row max_frames-1, the rest in between.
  interpolate_frame_positions: bool = False
  use_frame_positions: bool = True  # False: frame order is invisible to the video Q-Former (ablation)
  dtype: str = "float32"  # trainable parts: frame table and llama_proj (Q-Former: its own config)

  def __post_init__(self):
    if self.image_qformer.encoder_width != self.vit.width:
      raise ConfigError(f"image Q-Former encoder_width {self.image_qformer.encoder_width} != ViT width "
                        f"{self.vit.width}")
    if self.video_qformer.encoder_width != self.image_qformer.hidden_size:
      raise ConfigError(f"video Q-Former encoder_width {self.video_qformer.encoder_width} != image "
                        f"Q-Former hidden size {self.image_qformer.hidden_size}")

  @classmethod
  def release(cls, llm_hidden_size: int, **runtime: Any) -> "VideoBranchConfig":
    """The released system: ViT-g (bf16, frozen), BLIP-2 Q-Former (frozen), 2-layer video Q-Former."""
    return cls(vit=EvaVitConfig.vit_g(), image_qformer=QFormerConfig.image(dtype="bfloat16"),
               video_qformer=QFormerConfig.video(), llm_hidden_size=llm_hidden_size, **runtime)

  @classmethod
  def tiny(cls, llm_hidden_size: int = 64, **runtime: Any) -> "VideoBranchConfig":
    vit = EvaVitConfig.tiny(dtype="float32")
    image = QFormerConfig.tiny(encoder_width=vit.width)
    video = QFormerConfig.tiny(encoder_width=image.hidden_size, num_layers=2, cross_attention_freq=1,
                               num_query_tokens=6)
    return cls(vit=vit, image_qformer=image, video_qformer=video, llm_hidden_size=llm_hidden_size,
               **({"max_frames": 8} | runtime))

  def replace(self, **changes: Any) -> "VideoBranchConfig":
    return dataclasses.replace(self, **changes)


class VideoBranch(nnx.Module):

  def __init__(self, cfg: VideoBranchConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.visual_encoder = EvaVisionTransformer(cfg.vit, rngs=rngs)  # includes ln_vision
    self.qformer = QFormer(cfg.image_qformer, rngs=rngs)
    width = cfg.image_qformer.hidden_size
    # PyTorch's nn.Embedding default init, N(0, 1), as the reference trains it from scratch.
    self.frame_position_embedding = param(rngs, nnx.initializers.normal(1.0), (cfg.max_frames, width),
                                          cfg.dtype, ("positions", "embed"))
    self.video_qformer = QFormer(cfg.video_qformer, rngs=rngs)
    # nn.Linear's default init (the reference loads llama_proj from MiniGPT-4 or trains it).
    bound = width ** -0.5
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.llama_proj = Linear(width, cfg.llm_hidden_size, names=(None, "embed"), use_bias=True,
                             dtype=cfg.dtype, rngs=rngs, kernel_init=uniform, bias_init=uniform)

  def frame_features(self, frames: jax.Array) -> jax.Array:
    """(B, T, H, W, 3) -> image Q-Former outputs (B, T, Nq, 768) of the frozen encoders."""
    b, t = frames.shape[:2]
    pixels = frames.reshape((b * t,) + frames.shape[2:]).astype(self.visual_encoder.dtype)
    image_embeds = self.visual_encoder(pixels)
    queries = self.qformer(image_embeds)
    return queries.reshape((b, t) + queries.shape[1:])

  def frame_positions(self, num_frames: int) -> jax.Array:
    table = self.frame_position_embedding[...]
    if num_frames <= self.config.max_frames:
      return table[:num_frames]
    if not self.config.interpolate_frame_positions:
      raise ConfigError(f"{num_frames} frames, but the frame position table has {self.config.max_frames} "
                        "rows; sample fewer frames or set interpolate_frame_positions")
    source = jnp.linspace(0.0, self.config.max_frames - 1, num_frames)  # align corners
    low = jnp.floor(source).astype(jnp.int32)
    high = jnp.minimum(low + 1, self.config.max_frames - 1)
    weight = (source - low)[:, None]
    return table[low] * (1 - weight) + table[high] * weight

  def __call__(self, frames: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """frames (B, T, H, W, 3), CLIP-normalised -> (B, Nq_video, llm_hidden_size)."""
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"frames have shape {tuple(frames.shape)}; expected (batch, frames, height, width, 3)")
    return self.from_features(self.frame_features(frames), deterministic=deterministic, rngs=rngs)

  def from_features(self, features: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """The trainable rest: `frame_features` (B, T, Nq, W) -> (B, Nq_video, llm_hidden_size)."""
    width = self.config.image_qformer.hidden_size
    if features.ndim != 4 or features.shape[-1] != width:
      raise ValueError(f"frame features have shape {tuple(features.shape)}; expected (batch, frames, "
                       f"queries, {width})")
    features = jax.lax.stop_gradient(features)  # frozen encoders
    b, t, nq, width = features.shape
    features = features.astype(jnp.float32)
    if self.config.use_frame_positions:
      features = features + self.frame_positions(t).astype(jnp.float32)[None, :, None, :]
    tokens = features.reshape(b, t * nq, width).astype(self.video_qformer.dtype)
    video_queries = self.video_qformer(tokens, deterministic=deterministic, rngs=rngs)
    return self.llama_proj(video_queries)
