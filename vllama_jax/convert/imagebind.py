"""`imagebind_huge.pth` (flat keys; `audio_encoder.` inside a Video-LLaMA model) -> `ImageBindEncoder` trees.

Only the audio and vision encoders are converted. Keys of ImageBind's other modalities (text, depth,
thermal, imu) are dropped on purpose by `IGNORED` / `ignored_patterns`, as are those of audio or vision
when its config is not given; any other unknown key is an error (one `CheckpointError` naming every
unexpected, missing or mis-shaped key, see `tree.fill`).

Transforms:
* `attn.in_proj_weight` (3W, W) / `in_proj_bias` (3W,): q, k, v are row slices [0:W], [W:2W], [2W:3W].
* `attn.bias_k` / `bias_v` (1, 1, W) -> (W,).
* audio stem Conv2d weight (O, I, kh, kw) -> (kh, kw, I, O).
* vision stem Conv3d weight (O, 3, 2, kh, kw): ImageBind feeds it an image repeated into two equal
  frames (PadIm2Video "repeat", ntimes=2) with kernel = stride = (2, 14, 14), so the output is
  sum_t W[:, :, t] * x: the weight is summed over its time axis (in float32), then permuted like a
  Conv2d's. This holds only for single images, which is how Video-LLaMA uses it.
* `modality_postprocessors.audio.1.log_logit_scale` (a scalar buffer, ln 20) is kept, in float32.
"""

from __future__ import annotations

import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vllama_jax.convert import tree
from vllama_jax.errors import ConfigError
from vllama_jax.models.imagebind import ImageBindConfig, ImageBindEncoder
from vllama_jax.sharding import abstract_model

OTHER_MODALITIES = ("text", "depth", "thermal", "imu")
PARTS = ("preprocessors", "trunks", "heads", "postprocessors")


def ignored_patterns(prefix: str = "", modalities: Iterable[str] = OTHER_MODALITIES) -> list[re.Pattern]:
  """Regexes for every key of the given ImageBind modalities (dropped on purpose)."""
  names = "|".join(re.escape(m) for m in modalities)
  if not names:
    return []
  return [re.compile(re.escape(prefix) + rf"modality_(?:{'|'.join(PARTS)})\.(?:{names})\..+")]


IGNORED = ignored_patterns()


def _rows(start: int, stop: int, weight: bool) -> tree.Transform:  # one of q / k / v of the fused in_proj
  return (lambda t: t[start:stop].T) if weight else (lambda t: t[start:stop])


def _conv2d_kernel(t: np.ndarray) -> np.ndarray:  # (O, I, kh, kw) -> (kh, kw, I, O)
  return t.transpose(2, 3, 1, 0)


def _fold_conv3d_kernel(t: np.ndarray) -> np.ndarray:  # (O, I, 2, kh, kw) -> (kh, kw, I, O), time summed
  return t.astype(np.float32).sum(axis=2).transpose(2, 3, 1, 0)


def _drop_batch(t: np.ndarray) -> np.ndarray:  # (1, 1, W) -> (W,); (1, P, W) -> (P, W)
  return t.reshape(t.shape[2:] if t.shape[1] == 1 else t.shape[1:])


def modality_key_map(cfg: ImageBindConfig, prefix: str = "", root: tuple = ()) -> dict[str, tree.Rule]:
  """Every source key of one ImageBind modality -> Rule into a tree rooted at `root`."""
  m, w, f, k = cfg.modality, cfg.width, cfg.mlp_dim, cfg.kernel_size
  one = lambda shape, path, transform=None, row=None: tree.Rule(((root + path, row, transform),), shape)
  pre, trunk, head = (f"{prefix}modality_{part}.{m}." for part in ("preprocessors", "trunks", "heads"))
  mapping = {
      pre + "cls_token": one((1, 1, w), ("cls_token",), _drop_batch),
      pre + "pos_embedding_helper.pos_embed": one((1, cfg.num_positions, w), ("pos_embed",), _drop_batch),
      head + "0.weight": one((w,), ("head_norm", "scale")),
      head + "0.bias": one((w,), ("head_norm", "bias")),
      head + "2.weight": one((cfg.out_dim, w), ("head", "kernel"), tree.transpose),
  }
  if m == "audio":
    mapping[pre + "rgbt_stem.proj.weight"] = one((w, cfg.in_channels, k, k), ("stem", "kernel"), _conv2d_kernel)
  else:
    mapping[pre + "rgbt_stem.proj.1.weight"] = one((w, cfg.in_channels, 2, k, k), ("stem", "kernel"),
                                                   _fold_conv3d_kernel)
  if cfg.stem_norm:
    mapping[pre + "rgbt_stem.norm_layer.weight"] = one((w,), ("stem_norm", "scale"))
    mapping[pre + "rgbt_stem.norm_layer.bias"] = one((w,), ("stem_norm", "bias"))
  if cfg.pre_norm:
    mapping[trunk + "pre_transformer_layer.0.weight"] = one((w,), ("pre_norm", "scale"))
    mapping[trunk + "pre_transformer_layer.0.bias"] = one((w,), ("pre_norm", "bias"))
  if cfg.logit_scale:
    mapping[f"{prefix}modality_postprocessors.{m}.1.log_logit_scale"] = one((), ("log_logit_scale",))
  for i in range(cfg.depth):
    block = lambda shape, path, transform=None: one(shape, ("blocks",) + path, transform, i)
    source = f"{trunk}blocks.{i}."
    fused = lambda weight: tree.Rule(tuple(
        (root + ("blocks", "attn", name, "kernel" if weight else "bias"), i, _rows(j * w, (j + 1) * w, weight))
        for j, name in enumerate(("q", "k", "v"))), (3 * w, w) if weight else (3 * w,))
    mapping |= {
        source + "attn.in_proj_weight": fused(True),
        source + "attn.in_proj_bias": fused(False),
        source + "attn.out_proj.weight": block((w, w), ("attn", "out", "kernel"), tree.transpose),
        source + "attn.out_proj.bias": block((w,), ("attn", "out", "bias")),
        source + "norm_1.weight": block((w,), ("norm_1", "scale")),
        source + "norm_1.bias": block((w,), ("norm_1", "bias")),
        source + "norm_2.weight": block((w,), ("norm_2", "scale")),
        source + "norm_2.bias": block((w,), ("norm_2", "bias")),
        source + "mlp.fc1.weight": block((f, w), ("mlp", "fc1", "kernel"), tree.transpose),
        source + "mlp.fc1.bias": block((f,), ("mlp", "fc1", "bias")),
        source + "mlp.fc2.weight": block((w, f), ("mlp", "fc2", "kernel"), tree.transpose),
        source + "mlp.fc2.bias": block((w,), ("mlp", "fc2", "bias")),
    }
    if cfg.bias_kv:
      mapping[source + "attn.bias_k"] = block((1, 1, w), ("attn", "bias_k"), _drop_batch)
      mapping[source + "attn.bias_v"] = block((1, 1, w), ("attn", "bias_v"), _drop_batch)
  return mapping


def _configs(audio_cfg, vision_cfg) -> dict[str, ImageBindConfig]:
  configs = {"audio": audio_cfg, "vision": vision_cfg}
  for name, cfg in configs.items():
    if cfg is not None and cfg.modality != name:
      raise ConfigError(f"the {name} config has modality {cfg.modality!r}")
  return {name: cfg for name, cfg in configs.items() if cfg is not None}


def imagebind_key_map(audio_cfg: ImageBindConfig | None = None, vision_cfg: ImageBindConfig | None = None,
                      prefix: str = "") -> dict[str, tree.Rule]:
  """Source key -> Rule for the given modalities, targets rooted at "audio" / "vision" (see
  `imagebind_params`). `prefix` is e.g. "audio_encoder." for keys inside a Video-LLaMA model."""
  mapping = {}
  for name, cfg in _configs(audio_cfg, vision_cfg).items():
    mapping |= modality_key_map(cfg, prefix, (name,))
  return mapping


def abstract_params(cfg: ImageBindConfig) -> dict:
  return nnx.to_pure_dict(abstract_model(lambda: ImageBindEncoder(cfg, rngs=nnx.Rngs(0)))[1])


def allocate(cfg: ImageBindConfig) -> dict:
  """Uninitialised numpy arrays in `cfg.dtype`, the logit-scale buffer in float32."""
  out = tree.allocate(abstract_params(cfg), cfg.dtype)
  if cfg.logit_scale:
    out["log_logit_scale"] = np.empty((), np.float32)
  return out


def imagebind_params(tensors: Iterable[tuple[str, str, np.ndarray]], audio_cfg: ImageBindConfig | None = None,
                     vision_cfg: ImageBindConfig | None = None, *, prefix: str = "", ignored: Iterable = (),
                     source: str = "checkpoint") -> dict[str, dict]:
  """{"audio": tree, "vision": tree} (those configured) of numpy arrays from a stream of (file, key,
  tensor). The other modalities' keys, and audio's / vision's when its config is None, are ignored."""
  configs = _configs(audio_cfg, vision_cfg)
  if not configs:
    raise ConfigError("imagebind_params needs an audio or a vision config")
  out = {name: allocate(cfg) for name, cfg in configs.items()}
  skipped = OTHER_MODALITIES + tuple(m for m in ("audio", "vision") if m not in configs)
  tree.fill(out, tensors, imagebind_key_map(audio_cfg, vision_cfg, prefix),
            [*ignored_patterns(prefix, skipped), *ignored], source)
  return out


def model_from_params(cfg: ImageBindConfig, params: dict) -> ImageBindEncoder:
  """An ImageBindEncoder holding `params` (one modality's tree from `imagebind_params`)."""
  graphdef, state = abstract_model(lambda: ImageBindEncoder(cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
