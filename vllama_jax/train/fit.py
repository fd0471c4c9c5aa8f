"""The small in-memory training loop of the synthetic job's pretraining stages (stage 0, the vision
tower): AdamW with warm-up then cosine decay, on random rows of a few arrays, every parameter trained.
The Q-Formers train in `train.loop` instead, through the real data pipeline."""

from __future__ import annotations

import jax
import numpy as np
import optax


def fit(loss_fn, params, arrays, *, steps: int, batch_size: int, lr: float, warmup: int, decay_steps: int,
        seed: int, progress: str, keyed: bool = False, log=print):
  """Minimises `loss_fn(params, *rows[, key])` over `steps` batches of `batch_size` rows drawn at random
  from `arrays` (all of one length); `keyed` passes a fresh PRNG key each step. Logs `progress`
  (formatted with step, steps, loss) four times; returns (params, last loss)."""
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, lr / 10), weight_decay=0.01)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  loss = float("nan")
  for s in range(steps):
    pick = rng.integers(0, len(arrays[0]), batch_size)
    batch = [a[pick] for a in arrays] + ([jax.random.fold_in(key, s)] if keyed else [])
    params, opt_state, loss = step(params, opt_state, *batch)
    if (s + 1) % max(steps // 4, 1) == 0:
      log(progress.format(step=s + 1, steps=steps, loss=float(loss)))
  return params, float(loss)
