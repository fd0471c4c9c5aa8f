"""The jitted train and eval steps: pure functions of (trainable params, frozen params, batch).

Only the trainable split is differentiated; the frozen split is a separate jit argument that is
never updated, so it stays bit-identical. With a mesh, parameters and optimizer state are placed
by their logical axis names (`sharding.py`) and the batch is split over ('data', 'fsdp').

Gradient accumulation runs inside the step: the batch is cut into `accum_steps` microbatches
(row i goes to microbatch i % accum_steps, so each device keeps a share of every microbatch), a
scan adds each microbatch's *summed* token losses, their gradients and token counts, and the sums
are divided once by the batch's token count. The result is the token-level mean over the whole
batch, exactly what one step on the full batch computes (optax.MultiSteps would average
per-microbatch means instead, weighting microbatches equally whatever their token counts).

The frozen encoders (EVA with the image Q-Former, ImageBind's audio tower) run first, in a program of
their own, and the step proper on their outputs, as on a batch read from `data.features_dir`.

A step whose loss or gradients are not finite, or whose batch has no target token (the reference
gets a NaN loss there and its GradScaler skips it), leaves params and optimizer state unchanged;
the step counter still advances (the reference's lr follows the iteration) and `skipped` counts it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vllama_jax.errors import ConfigError
from vllama_jax.sharding import constrain, logical_to_spec
from vllama_jax.train.flops import count_flops
from vllama_jax.train.loss import token_nll
from vllama_jax.train.optimizer import Optimizer
from vllama_jax.train.trainable import dotted

# Which modality rows a batch feeds the LLM: "video" (VL stages), "audio_vision" (AL stages as the
# paper trains them: frames through ImageBind's vision tower), "audio" (filterbanks), and
# "audio_video" (audio rows then video rows; a joint setup of ours).
MODES = ("video", "audio_vision", "audio", "audio_video")
QFORMERS = {"video": "video_branch.video_qformer.", "audio": "audio_branch.audio_qformer."}


class TrainState(NamedTuple):
  params: nnx.State  # the trainable split, float32
  opt_state: Any
  step: jax.Array  # int32: train steps taken, skipped ones included
  rng: jax.Array  # dropout key; step s uses fold_in(rng, s)
  skipped: jax.Array  # int32: steps skipped for a non-finite loss/gradient or no target token


def _variable_sharding(mesh: Mesh):
  def one(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding") or (None,) * len(x.shape)
      return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh))
    return NamedSharding(mesh, PartitionSpec())  # counters, keys
  return one


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for any tree holding nnx Variables (params, optimizer state) and plain leaves."""
  return jax.tree.map(_variable_sharding(mesh), tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
  """Every batch array split over ('data', 'fsdp') on its first axis."""
  return {k: NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (jnp.ndim(v) - 1), jnp.shape(v), mesh))
          for k, v in batch.items()}


def _jitted_init(optimizer: Optimizer, seed: int | jax.Array, mesh: Mesh | None, params):
  rng = jax.random.key(seed) if isinstance(seed, int) else seed
  zero = jnp.zeros((), jnp.int32)

  def init(p):
    return TrainState(jax.tree.map(jnp.copy, p), optimizer.tx.init(p), zero, rng, zero)

  if mesh is None:
    return jax.jit(init)
  return jax.jit(init, out_shardings=tree_shardings(jax.eval_shape(init, params), mesh))


def init_train_state(params: nnx.State, optimizer: Optimizer, seed: int | jax.Array = 0,
                     mesh: Mesh | None = None) -> TrainState:
  """A fresh state; `params` is copied (train steps donate the state) and, with a mesh, placed."""
  return _jitted_init(optimizer, seed, mesh, params)(params)


def train_state_shapes(params: nnx.State, optimizer: Optimizer, mesh: Mesh, seed: int | jax.Array = 0) -> TrainState:
  """The state `init_train_state` makes, as ShapeDtypeStructs with its shardings on `mesh` (a
  checkpoint's restore target); `params` may be abstract. Allocates nothing."""
  return _jitted_init(optimizer, seed, mesh, params).eval_shape(params)


def modality_rows(model, batch: dict, mode: str, *, dropout: dict[str, bool], rngs=None) -> jax.Array:
  """The (B, M, H) rows that `batch['source']` indexes; `dropout[branch]` turns on that Q-Former's
  dropout. A batch read from frozen features (`data.frozen_features`) holds the frozen encoders'
  outputs in place of frames and filterbanks, and only the trainable rest runs."""
  def video():
    kw = dict(deterministic=not dropout["video"], rngs=rngs)
    if "frame_features" in batch:
      return model.video_branch.from_features(batch["frame_features"], **kw)
    return model.video_branch(batch["frames"], **kw)
  kw = dict(deterministic=not dropout["audio"], rngs=rngs)
  if mode == "video":
    return video()
  if mode == "audio_vision":
    return model.audio_branch.encode_frames(batch["frames"][:, :model.audio_branch.config.num_positions], **kw)
  if "audio_embeddings" in batch:
    audio = model.audio_branch.from_embeddings(batch["audio_embeddings"], **kw)
  else:
    audio = model.audio_branch.encode_audio(batch["filterbanks"], **kw)
  if mode == "audio":
    return audio
  return jnp.concatenate([audio, video().astype(audio.dtype)], axis=1)


def row_runs(model_config, mode: str) -> tuple[int, ...] | None:
  """How many rows each run of `modality_rows` has, in order, for a model of `model_config` (a
  `VideoLlamaConfig`): its Q-Formers' query counts (None where it lacks a branch the mode needs)."""
  branches = {"video": ("video",), "audio": ("audio",), "audio_vision": ("audio",),
              "audio_video": ("audio", "video")}[mode]
  video, audio = model_config.video, model_config.audio
  counts = {"video": video and video.video_qformer.num_query_tokens, "audio": audio and audio.qformer.num_query_tokens}
  return None if any(counts[b] is None for b in branches) else tuple(counts[b] for b in branches)


# Media the frozen encoders read, and what they turn it into (what `data.features_dir` stores).
ENCODED = {"frames": "frame_features", "filterbanks": "audio_embeddings"}


def _encodes(mode: str) -> tuple[str, ...]:
  """The media of `mode`'s batches that a frozen encoder reads and nothing else does."""
  return {"video": ("frames",), "audio": ("filterbanks",), "audio_video": ("frames", "filterbanks"),
          "audio_vision": ()}[mode]


def _encode(graphdef, params, frozen, batch, mode, accum_steps=1):
  """The batch with each frozen encoder's output in place of its media (gradients never reach them:
  the branches stop them at these outputs). With `accum_steps`, one microbatch at a time, so that the
  encoders' activations are never those of the whole batch."""
  model = nnx.merge(graphdef, params, frozen)
  encoders = {"frames": lambda x: model.video_branch.frame_features(x),
              "filterbanks": lambda x: model.audio_branch.audio_encoder(x)}
  out = {k: v for k, v in batch.items() if k not in _encodes(mode)}
  for media in _encodes(mode):
    if media in batch:
      if accum_steps == 1:
        out[ENCODED[media]] = encoders[media](batch[media])
      else:  # undo _microbatches' interleave: (k, B / k, ...) -> (B / k, k, ...) -> (B, ...)
        encoded = jax.lax.map(encoders[media], _microbatches({media: batch[media]}, accum_steps)[media])
        out[ENCODED[media]] = jnp.swapaxes(encoded, 0, 1).reshape((-1,) + encoded.shape[2:])
  return out


def _nll(graphdef, params, frozen, batch, mode, dropout, key):
  model = nnx.merge(graphdef, params, frozen)
  rngs = nnx.Rngs(dropout=key) if key is not None else None
  rows = modality_rows(model, batch, mode, dropout=dropout, rngs=rngs)
  logits = model(batch["ids"], batch["source"], rows, batch["attention_mask"])
  return token_nll(logits, batch["labels"], batch.get("weight"))


def check_mode(mode: str):
  if mode not in MODES:
    raise ConfigError(f"unknown training mode {mode!r}; expected one of {MODES}")


def _microbatches(batch: dict, k: int) -> dict:
  def split(x):
    if x.shape[0] % k:
      raise ConfigError(f"batch of {x.shape[0]} rows does not split into {k} microbatches")
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)  # microbatch i = rows i, i + k, i + 2k, ...
  return {name: split(x) for name, x in batch.items()}


def _constrain_batch(batch: dict) -> dict:
  return {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}


def _compile(fn, mesh, donate, make_in_shardings, make_out_shardings):
  """jax.jit of `fn`, built on the first call of each argument structure (shardings depend on it);
  `make_out_shardings(*args)` gives the outputs' shardings (or a prefix of them)."""
  cache: dict = {}

  def call(*args):
    key = jax.tree.structure(args), tuple(jnp.shape(x) for x in jax.tree.leaves(args))
    if key not in cache:
      if mesh is None:
        cache[key] = jax.jit(fn, donate_argnums=donate)
      else:
        cache[key] = jax.jit(fn, in_shardings=make_in_shardings(*args),
                             out_shardings=make_out_shardings(*args), donate_argnums=donate)
    if mesh is None:
      return cache[key](*args)
    with jax.set_mesh(mesh):
      return cache[key](*args)

  return call


def make_train_step(graphdef: nnx.GraphDef, frozen: nnx.State, optimizer: Optimizer, mode: str,
                    mesh: Mesh | None = None, *, accum_steps: int = 1,
                    dropout: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`step(state, batch) -> (state, metrics)`, jitted, `state` donated.

  metrics: loss (token mean), tokens, grad_norm (before clipping), lr, skipped (0/1).
  `dropout=False` runs the Q-Formers deterministically (for equivalence tests).
  """
  check_mode(mode)
  if accum_steps < 1:
    raise ConfigError(f"accum_steps must be >= 1, got {accum_steps}")
  if mesh is not None:
    frozen = jax.device_put(frozen, tree_shardings(frozen, mesh))

  def step(state: TrainState, frozen, batch):
    paths = [dotted(p) for p, _ in nnx.to_flat_state(state.params)]
    # Dropout acts in the Q-Formers that train, as in the reference's train mode.
    on = {b: dropout and any(p.startswith(q) for p in paths) for b, q in QFORMERS.items()}
    key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(lambda p, mb, k: _nll(graphdef, p, frozen, mb, mode, on, k), has_aux=True)
    if accum_steps == 1:
      (total, tokens), grads = grad_fn(state.params, batch, key)
    else:
      def body(carry, xs):
        i, mb = xs
        (t, n), g = grad_fn(state.params, _constrain_batch(mb), jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (t, n, g)), None
      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
               jax.tree.map(jnp.zeros_like, state.params))
      (total, tokens, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps),
                                                             _microbatches(batch, accum_steps)))
    scale = 1.0 / jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    loss = total * scale
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (tokens > 0)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    lr = optimizer.schedule(state.step)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    skipped = (~ok).astype(jnp.int32)
    new_state = TrainState(keep(params, state.params), keep(opt_state, state.opt_state),
                           state.step + 1, state.rng, state.skipped + skipped)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "lr": lr, "skipped": skipped}
    return new_state, metrics

  def in_shardings(state, frozen_, batch):
    return tree_shardings(state, mesh), tree_shardings(frozen_, mesh), batch_shardings(batch, mesh)

  def out_shardings(state, frozen_, batch):  # the new state is placed as the old; metrics are replicated
    return tree_shardings(state, mesh), NamedSharding(mesh, PartitionSpec())

  compiled = _compile(step, mesh, (0,), in_shardings, out_shardings)

  def encode_fn(params, frozen_, batch):
    return _encode(graphdef, params, frozen_, batch, mode, accum_steps)

  def encode_out_shardings(*args):
    return batch_shardings(jax.eval_shape(encode_fn, *args), mesh)

  encode = _compile(encode_fn, mesh, (), in_shardings, encode_out_shardings)  # in_shardings fits any trees

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    # Two programs rather than one: on XLA:CPU the pair takes about a fifth less time than one program
    # holding both (bench/train.py: 5.6 -> 4.7 s); the results are the same.
    if mesh is not None:
      batch = jax.device_put(batch, batch_shardings(batch, mesh))
    if any(media in batch for media in _encodes(mode)):
      batch = encode(state.params, frozen, batch)
    return compiled(state, frozen, batch)

  def flops(state: TrainState, batch: dict) -> float:
    """Matmul FLOPs of one whole step (frozen encoders, forward, backward, optimizer) over all devices,
    counted on its jaxprs with every scanned layer (`flops.py`); nan if it cannot be traced."""
    try:
      with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        encoded = jax.eval_shape(encode_fn, state.params, frozen, batch)
        return float(count_flops(encode_fn, state.params, frozen, batch) + count_flops(step, state, frozen, encoded))
    except Exception:  # best effort: the MFU estimate must not stop training
      return float("nan")

  train_step.flops = flops
  return train_step


def make_eval_step(graphdef: nnx.GraphDef, frozen: nnx.State, mode: str,
                   mesh: Mesh | None = None) -> Callable[[nnx.State, dict], dict]:
  """`evaluate(params, batch) -> {loss, nll_sum, tokens}`, deterministic; sum `nll_sum` and `tokens`
  over batches for a dataset-level token mean."""
  check_mode(mode)
  if mesh is not None:
    frozen = jax.device_put(frozen, tree_shardings(frozen, mesh))
  off = {b: False for b in QFORMERS}

  def evaluate(params, frozen, batch):
    total, tokens = _nll(graphdef, params, frozen, batch, mode, off, None)
    return {"loss": total / jnp.maximum(tokens, 1.0), "nll_sum": total, "tokens": tokens}

  def in_shardings(params, frozen_, batch):
    return tree_shardings(params, mesh), tree_shardings(frozen_, mesh), batch_shardings(batch, mesh)

  compiled = _compile(evaluate, mesh, (), in_shardings, lambda *args: NamedSharding(mesh, PartitionSpec()))

  def eval_step(params: nnx.State, batch: dict) -> dict:
    if mesh is not None:
      batch = jax.device_put(batch, batch_shardings(batch, mesh))
    return compiled(params, frozen, batch)

  return eval_step
