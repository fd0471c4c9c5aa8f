"""Video-LLaMA: the video branch, the audio branch and the LLaMA decoder in one module.

A prompt reaches the decoder as two parallel int arrays (see `text.prompt.PromptLayout`):
`ids` holds text token ids and `source` says, per position, which row of the modality
embeddings replaces the token there (-1: keep the text embedding). Placeholder ids never reach
the embedding table, which is not resized, as in the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vllama_jax.config import LlamaConfig
from vllama_jax.errors import ConfigError
from vllama_jax.models.audio_branch import AudioBranch, AudioBranchConfig
from vllama_jax.models.llama import Llama
from vllama_jax.models.video_branch import VideoBranch, VideoBranchConfig

MODES = ("video", "image", "audio", "audio_video")  # as text.conversation.MODES


@dataclasses.dataclass(frozen=True)
class VideoLlamaConfig:
  llama: LlamaConfig
  video: VideoBranchConfig | None = None
  audio: AudioBranchConfig | None = None

  def __post_init__(self):
    for name, branch in (("video", self.video), ("audio", self.audio)):
      if branch is not None and branch.llm_hidden_size != self.llama.hidden_size:
        raise ConfigError(f"the {name} branch projects to {branch.llm_hidden_size}, but the LLM's hidden "
                          f"size is {self.llama.hidden_size}")

  def replace(self, **changes: Any) -> "VideoLlamaConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, vocab_size: int, hidden_size: int = 64, **llama_changes: Any) -> "VideoLlamaConfig":
    """Small widths and two layers everywhere, but the released input sizes: 224 x 224 frames in
    14-pixel patches and (128, 204) filterbanks, so real media run through it."""
    from vllama_jax.config import llama_preset
    from vllama_jax.models.eva_vit import EvaVitConfig
    from vllama_jax.models.imagebind import ImageBindConfig
    from vllama_jax.models.qformer import QFormerConfig
    llama = llama_preset("tiny", vocab_size=vocab_size, hidden_size=hidden_size, **llama_changes)
    vit = EvaVitConfig.tiny(image_size=224, dtype="float32")
    image = QFormerConfig.tiny(encoder_width=vit.width)
    video_q = QFormerConfig.tiny(encoder_width=image.hidden_size, num_layers=2, cross_attention_freq=1,
                                 num_query_tokens=6)
    video = VideoBranchConfig(vit=vit, image_qformer=image, video_qformer=video_q, llm_hidden_size=hidden_size)
    imagebind = ImageBindConfig.tiny_audio(input_size=(128, 204), kernel_size=16, stride=10, dtype="float32")
    audio_q = QFormerConfig.tiny(encoder_width=imagebind.out_dim, num_layers=2, cross_attention_freq=1,
                                 num_query_tokens=4)
    audio = AudioBranchConfig(audio=imagebind, vision=None, qformer=audio_q, llm_hidden_size=hidden_size,
                              train_on="audio")
    return cls(llama=llama, video=video, audio=audio)


class VideoLLaMA(nnx.Module):

  def __init__(self, cfg: VideoLlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.llama = Llama(cfg.llama, rngs=rngs)
    self.video_branch = VideoBranch(cfg.video, rngs=rngs) if cfg.video is not None else None
    self.audio_branch = AudioBranch(cfg.audio, rngs=rngs) if cfg.audio is not None else None

  @classmethod
  def from_pretrained(cls, directory: str, mesh: jax.sharding.Mesh | None = None, **options) -> "VideoLLaMA":
    """Loads a directory written by convert_weights.py; see `pretrained.load_video_llama`."""
    from vllama_jax.pretrained import load_video_llama
    return load_video_llama(directory, mesh, **options)

  @property
  def modes(self) -> tuple[str, ...]:
    video, audio = self.video_branch is not None, self.audio_branch is not None
    return tuple(m for m, ok in zip(MODES, (video, video, audio, video and audio)) if ok)

  def encode_video(self, frames: jax.Array) -> jax.Array:
    """(B, T, 224, 224, 3) CLIP-normalised frames -> (B, 32, H); images are T = 1."""
    if self.video_branch is None:
      raise ConfigError("this model has no video branch; convert it with --eva and --blip2")
    return self.video_branch(frames)

  def encode_audio(self, filterbanks: jax.Array) -> jax.Array:
    """(B, 8, 1, 128, 204) normalised filterbanks -> (B, 8, H)."""
    if self.audio_branch is None:
      raise ConfigError("this model has no audio branch; convert it with --imagebind")
    return self.audio_branch.encode_audio(filterbanks)

  def embed(self, ids: jax.Array, source: jax.Array, modality: jax.Array) -> jax.Array:
    """Prompt embeddings (B, L, H): text embeddings with row `source` of `modality` (B, M, H) spliced
    in wherever source >= 0."""
    spliced = source >= 0
    text = self.llama.embed(jnp.where(spliced, 0, ids))
    rows = jnp.take_along_axis(modality, jnp.maximum(source, 0)[..., None], axis=1)
    return jnp.where(spliced[..., None], rows.astype(text.dtype), text)

  def __call__(self, ids: jax.Array, source: jax.Array, modality: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Float32 logits (B, L, V) of a spliced prompt batch."""
    return self.llama(inputs_embeds=self.embed(ids, source, modality), attention_mask=attention_mask)
