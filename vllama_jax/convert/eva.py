"""LAVIS / EVA state dict (`eva_vit_g.pth` + BLIP-2's `ln_vision`) -> our `EvaVisionTransformer` tree.

The fused qkv weight feeds three targets (q, k, v) and the Conv2d patch kernel needs an axis
permutation: both are `tree.Rule` transforms, so `tree.fill` streams and accounts for every key.

`eva_vit_g.pth` holds EVA-CLIP's 40 blocks; BLIP-2 uses the first 39 (features of the second-to-last
block), so `blocks.{i}.*` with i >= depth are dropped on purpose. Any other unknown key is an error:
a caller streaming a whole BLIP-2 / Video-LLaMA checkpoint must pass only its `ln_vision.*` keys.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vllama_jax.convert import tree
from vllama_jax.models.eva_vit import EvaVisionTransformer, EvaVitConfig
from vllama_jax.sharding import abstract_model

def _rows(start: int, stop: int) -> tree.Transform:  # one of q / k / v from the fused (3W, W) weight
  return lambda t: t[start:stop].T


def _conv_kernel(t: np.ndarray) -> np.ndarray:  # torch Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
  return t.transpose(2, 3, 1, 0)


def _drop_batch(t: np.ndarray) -> np.ndarray:  # cls_token (1, 1, W) -> (W,); pos_embed (1, P, W) -> (P, W)
  return t.reshape(t.shape[2:] if t.shape[1] == 1 else t.shape[1:])


def eva_key_map(cfg: EvaVitConfig, prefix: str = "", ln_vision_key: str = "ln_vision") -> dict[str, tree.Rule]:
  """Every expected source key -> Rule. `prefix` is e.g. "visual_encoder." for a whole LAVIS model."""
  w, p, m = cfg.width, cfg.patch_size, cfg.mlp_dim
  one = lambda shape, path, transform=None, row=None: tree.Rule(((path, row, transform),), shape)
  mapping = {
      prefix + "cls_token": one((1, 1, w), ("cls_token",), _drop_batch),
      prefix + "pos_embed": one((1, cfg.num_positions, w), ("pos_embed",), _drop_batch),
      prefix + "patch_embed.proj.weight": one((w, 3, p, p), ("patch_embed", "kernel"), _conv_kernel),
      prefix + "patch_embed.proj.bias": one((w,), ("patch_embed", "bias")),
      f"{ln_vision_key}.weight": one((w,), ("ln_vision", "scale")),
      f"{ln_vision_key}.bias": one((w,), ("ln_vision", "bias")),
  }
  for i in range(cfg.depth):
    block = lambda shape, path, transform=None: one(shape, ("blocks",) + path, transform, i)
    source = f"{prefix}blocks.{i}."
    mapping |= {
        source + "norm1.weight": block((w,), ("norm1", "scale")),
        source + "norm1.bias": block((w,), ("norm1", "bias")),
        source + "norm2.weight": block((w,), ("norm2", "scale")),
        source + "norm2.bias": block((w,), ("norm2", "bias")),
        source + "attn.qkv.weight": tree.Rule(tuple(
            (("blocks", "attn", name, "kernel"), i, _rows(j * w, (j + 1) * w))
            for j, name in enumerate(("q", "k", "v"))), (3 * w, w)),
        source + "attn.q_bias": block((w,), ("attn", "q", "bias")),
        source + "attn.v_bias": block((w,), ("attn", "v", "bias")),
        source + "attn.proj.weight": block((w, w), ("attn", "proj", "kernel"), tree.transpose),
        source + "attn.proj.bias": block((w,), ("attn", "proj", "bias")),
        source + "mlp.fc1.weight": block((m, w), ("mlp", "fc1", "kernel"), tree.transpose),
        source + "mlp.fc1.bias": block((m,), ("mlp", "fc1", "bias")),
        source + "mlp.fc2.weight": block((w, m), ("mlp", "fc2", "kernel"), tree.transpose),
        source + "mlp.fc2.bias": block((w,), ("mlp", "fc2", "bias")),
    }
  return mapping


def dropped_blocks(cfg: EvaVitConfig, prefix: str = "") -> Callable[[str], bool]:
  """True for keys of blocks BLIP-2 does not use (index >= depth): block 39 of eva_vit_g.pth."""
  pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\..+")

  def dropped(key: str) -> bool:
    match = pattern.fullmatch(key)
    return match is not None and int(match.group(1)) >= cfg.depth

  return dropped


def fill_eva_vit(out: dict, tensors: Iterable[tuple[str, str, np.ndarray]], cfg: EvaVitConfig, *,
                 prefix: str = "", ln_vision_key: str = "ln_vision", ignored: Iterable = (),
                 source: str = "checkpoint") -> None:
  """Copies each (file, key, tensor) into `out` (from `tree.allocate`), casting to its dtype."""
  rules = eva_key_map(cfg, prefix, ln_vision_key)
  tree.fill(out, tensors, rules, [dropped_blocks(cfg, prefix), *ignored], source)


def abstract_params(cfg: EvaVitConfig) -> dict:
  return nnx.to_pure_dict(abstract_model(lambda: EvaVisionTransformer(cfg, rngs=nnx.Rngs(0)))[1])


def eva_vit_params(cfg: EvaVitConfig, tensors: Iterable[tuple[str, str, np.ndarray]], **fill_kwargs) -> dict:
  """A numpy parameter tree in `cfg.dtype` from a stream of (file, key, tensor); see `fill_eva_vit`."""
  out = tree.allocate(abstract_params(cfg), cfg.dtype)
  fill_eva_vit(out, tensors, cfg, **fill_kwargs)
  return out


def model_from_params(cfg: EvaVitConfig, params: dict) -> EvaVisionTransformer:
  """An EvaVisionTransformer holding `params` (a pure dict such as `eva_vit_params` returns)."""
  graphdef, state = abstract_model(lambda: EvaVisionTransformer(cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
