"""Video-LLaMA's audio-language branch: 8 audio clips (or up to 8 frames) -> 8 LLM-width tokens.

  inference, real audio:  filterbanks (B, 8, 1, 128, 204) -> ImageBind audio -> (B, 8, 1024), norm 20
  training, as the paper: frames (B, T<=8, H, W, 3)       -> ImageBind vision -> (B, T, 1024), norm 1
    -> + audio position embedding row s   (trainable)
    -> audio Q-Former with its 8 query tokens (trainable)
    -> audio_llama_proj                   (trainable)  -> (B, 8, H_llm)

The released audio branch was trained only through ImageBind's *vision* tower and runs on *audio*
at inference; `AudioBranchConfig.train_on` picks which encoder feeds training, the paper's
"vision" or real "audio" (a joint audio-visual setup the paper did not use).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vllama_jax.errors import ConfigError
from vllama_jax.layers.linear import Linear, param
from vllama_jax.models.imagebind import ImageBindConfig, ImageBindEncoder
from vllama_jax.models.qformer import QFormer, QFormerConfig

TRAIN_ON = ("vision", "audio")


@dataclasses.dataclass(frozen=True)
class AudioBranchConfig:
  audio: ImageBindConfig
  qformer: QFormerConfig
  llm_hidden_size: int
  vision: ImageBindConfig | None = None  # needed only to train through frames
  num_positions: int = 8  # rows of the audio position table: at most 8 clips or frames
  train_on: str = "vision"
  dtype: str = "float32"  # trainable parts: position table and projection

  def __post_init__(self):
    if self.train_on not in TRAIN_ON:
      raise ConfigError(f"train_on {self.train_on!r} is not one of {TRAIN_ON}")
    if self.train_on == "vision" and self.vision is None:
      raise ConfigError("train_on='vision' needs the ImageBind vision config")
    for name, encoder in (("audio", self.audio), ("vision", self.vision)):
      if encoder is not None and encoder.out_dim != self.qformer.encoder_width:
        raise ConfigError(f"ImageBind {name} output {encoder.out_dim} != audio Q-Former encoder width "
                          f"{self.qformer.encoder_width}")

  @classmethod
  def release(cls, llm_hidden_size: int, **runtime: Any) -> "AudioBranchConfig":
    return cls(audio=ImageBindConfig.audio(), vision=ImageBindConfig.vision(), qformer=QFormerConfig.audio(),
               llm_hidden_size=llm_hidden_size, **runtime)

  def replace(self, **changes: Any) -> "AudioBranchConfig":
    return dataclasses.replace(self, **changes)


class AudioBranch(nnx.Module):

  def __init__(self, cfg: AudioBranchConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.audio_encoder = ImageBindEncoder(cfg.audio, rngs=rngs)
    self.vision_encoder = ImageBindEncoder(cfg.vision, rngs=rngs) if cfg.vision is not None else None
    width = cfg.qformer.encoder_width
    # PyTorch's nn.Embedding default init, N(0, 1), as the reference trains it from scratch.
    self.audio_position_embedding = param(rngs, nnx.initializers.normal(1.0), (cfg.num_positions, width),
                                          cfg.dtype, ("positions", "embed"))
    self.audio_qformer = QFormer(cfg.qformer, rngs=rngs)
    hidden = cfg.qformer.hidden_size
    bound = hidden ** -0.5  # nn.Linear's default init
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.audio_llama_proj = Linear(hidden, cfg.llm_hidden_size, names=(None, "embed"), use_bias=True,
                                   dtype=cfg.dtype, rngs=rngs, kernel_init=uniform, bias_init=uniform)

  def encode_audio(self, filterbanks: jax.Array, **kwargs) -> jax.Array:
    """(B, S<=8, 1, 128, 204) normalised filterbanks -> (B, num_queries, llm_hidden_size)."""
    if filterbanks.ndim != 5:
      raise ValueError(f"filterbanks have shape {tuple(filterbanks.shape)}; expected (batch, clips, 1, 128, 204)")
    embeddings = jax.lax.stop_gradient(self.audio_encoder(filterbanks))  # frozen
    return self.from_embeddings(embeddings, **kwargs)

  def encode_frames(self, frames: jax.Array, **kwargs) -> jax.Array:
    """(B, T<=8, H, W, 3) CLIP-normalised frames through ImageBind's vision tower, as the paper trains."""
    if self.vision_encoder is None:
      raise ConfigError("this audio branch has no ImageBind vision encoder")
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"frames have shape {tuple(frames.shape)}; expected (batch, frames, height, width, 3)")
    embeddings = jax.lax.stop_gradient(self.vision_encoder(jnp.moveaxis(frames, -1, 2)))  # frozen
    return self.from_embeddings(embeddings, **kwargs)

  def from_embeddings(self, embeddings: jax.Array, *, deterministic: bool = True,
                      rngs: nnx.Rngs | None = None) -> jax.Array:
    """The trainable rest: frozen ImageBind embeddings (B, S<=8, D) -> (B, num_queries, llm_hidden_size)."""
    if embeddings.ndim != 3 or embeddings.shape[-1] != self.config.qformer.encoder_width:
      raise ValueError(f"audio embeddings have shape {tuple(embeddings.shape)}; expected (batch, segments, "
                       f"{self.config.qformer.encoder_width})")
    embeddings = jax.lax.stop_gradient(embeddings)
    segments = embeddings.shape[1]
    if segments > self.config.num_positions:
      raise ConfigError(f"{segments} audio segments, but the audio position table has "
                        f"{self.config.num_positions} rows")
    positions = self.audio_position_embedding[...][:segments].astype(jnp.float32)
    tokens = (embeddings.astype(jnp.float32) + positions[None]).astype(self.audio_qformer.dtype)
    queries = self.audio_qformer(tokens, deterministic=deterministic, rngs=rngs)
    return self.audio_llama_proj(queries)
