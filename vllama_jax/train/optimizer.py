"""The reference optimizer: AdamW with a name-based weight-decay mask, and its warm-up + cosine schedule.

`Optimizer.tx` yields the AdamW direction *without* the learning rate (Adam step plus decoupled
weight decay); the train step multiplies by `-schedule(step)`, where `step` counts train steps
(skipped ones included). This keeps the reference's behaviour: its lr follows the iteration
number, while a step its GradScaler skips leaves the Adam state (and its bias correction count)
untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vllama_jax.errors import ConfigError

# The reference exempts a tensor from weight decay when its name contains one of these (or it is
# 1-D). Our names differ (LayerNorm "weight" is our "scale", its module is "norm"), so the rule is
# applied to our path parts with "norm"/"scale" added; tests check it against the reference names.
NO_DECAY = ("bias", "ln", "bn", "norm", "scale")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  init_lr: float = 1e-4
  min_lr: float = 8e-5
  warmup_lr: float | None = 1e-6  # None: start warm-up at init_lr (the reference's -1)
  warmup_steps: int = 2500
  iters_per_epoch: int = 2500
  max_epoch: int = 5
  weight_decay: float = 0.05
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = None  # global-norm clipping; the reference has none

  def __post_init__(self):
    if self.iters_per_epoch < 1 or self.max_epoch < 1:
      raise ConfigError(f"iters_per_epoch ({self.iters_per_epoch}) and max_epoch ({self.max_epoch}) "
                        "must be >= 1")
    if self.warmup_steps < 0:
      raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.init_lr < 0 or self.min_lr < 0:
      raise ConfigError(f"init_lr ({self.init_lr}) and min_lr ({self.min_lr}) must be >= 0")
    if self.clip_norm is not None and self.clip_norm <= 0:
      raise ConfigError(f"clip_norm must be positive or None, got {self.clip_norm}")

  def replace(self, **changes: Any) -> "OptimizerConfig":
    return dataclasses.replace(self, **changes)


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation  # direction without the learning rate
  schedule: optax.Schedule  # train step -> learning rate


def linear_warmup_cosine(init_lr: float, min_lr: float, warmup_lr: float | None, warmup_steps: int,
                         iters_per_epoch: int, max_epoch: int) -> optax.Schedule:
  """The reference `linear_warmup_cosine_lr` as a traceable function of the global step.

  While step < warmup_steps: warm-up driven by the step *within the current epoch*, capped at
  init_lr. Afterwards: cosine from init_lr to min_lr measured from step 0 over all
  max_epoch * iters_per_epoch steps, so the lr drops when warm-up ends.
  """
  warmup_lr = init_lr if warmup_lr is None or warmup_lr < 0 else warmup_lr
  total = max_epoch * iters_per_epoch

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    in_epoch = step - jnp.floor(step / iters_per_epoch) * iters_per_epoch
    warm = jnp.minimum(init_lr, warmup_lr + (init_lr - warmup_lr) * in_epoch / max(warmup_steps, 1))
    cosine = min_lr + (init_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * step / total))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def decays(path: tuple, ndim: int) -> bool:
  """The reference rule on our path: ndim >= 2 and no part names a bias or a norm."""
  return ndim >= 2 and not any(word in str(part).lower() for part in path for word in NO_DECAY)


def _key(entry) -> Any:
  for field in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(entry, field):
      return getattr(entry, field)
  return entry


def decay_mask(params) -> Any:
  """A bool per parameter (a prefix tree of `params`): True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: decays(tuple(_key(k) for k in path), jnp.ndim(v)), params, is_leaf=_is_variable)


def make_optimizer(cfg: OptimizerConfig, mask: Callable | None = None) -> Optimizer:
  """AdamW as the reference configures it; `mask` overrides the weight-decay mask function."""
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm is not None else []
  parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.masked(optax.add_decayed_weights(cfg.weight_decay), mask or decay_mask)]
  schedule = linear_warmup_cosine(cfg.init_lr, cfg.min_lr, cfg.warmup_lr, cfg.warmup_steps,
                                  cfg.iters_per_epoch, cfg.max_epoch)
  return Optimizer(optax.chain(*parts), schedule)
