"""Pre-training the synthetic job's tiny frozen vision tower on single frames.

Video-LLaMA's vision encoders arrive pretrained (EVA-CLIP, BLIP-2) and frozen: they already say
what is in a picture and where. A random tiny ViT and image Q-Former do not; their queries average
the patches away, so the shape's place in the frame (and with it the direction of motion) is lost
before the trainable video Q-Former sees it. This stage gives the tiny tower the same head start:
the ViT and the image Q-Former learn, from single still frames rendered apart from the dataset,
to tell the shape's colour and kind and where its centre is. Nothing here sees two frames at once,
so the order of frames (direction) is still left to the frame position embedding and the video
Q-Former, as in the paper.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vllama_jax.data import synthetic
from vllama_jax.media.image import normalize
from vllama_jax.train.fit import fit

TOWER = ("visual_encoder", "qformer")  # the frozen parts of a VideoBranch this stage trains
FRAME_SEED = 7919  # a stream of its own: no frame of the dataset is used
POSITION_WEIGHT = 10.0


def render_stills(count: int, seed: int, frames_per_clip: int = 4):
  """(frames float32 (N, S, S, 3) CLIP-normalised, colour (N,), shape (N,), centre (N, 2) in [-1, 1])
  from `count` random clips of the synthetic generator, `frames_per_clip` frames of each."""
  rng = np.random.default_rng([seed, FRAME_SEED])
  images, colours, shapes, centres = [], [], [], []
  for _ in range(count):
    attrs = {a: v[rng.integers(len(v))] for a, v in synthetic.VOCAB.items()}
    frames, track = synthetic.render_track(attrs, rng)
    pick = rng.choice(len(frames), frames_per_clip, replace=False)
    images.append(frames[pick])
    centres.append(track[pick] / synthetic.SIZE * 2 - 1)
    colours += [synthetic.VOCAB["colour"].index(attrs["colour"])] * frames_per_clip
    shapes += [synthetic.SHAPES.index(attrs["shape"])] * frames_per_clip
  return (normalize(np.concatenate(images)), np.asarray(colours, np.int32), np.asarray(shapes, np.int32),
          np.concatenate(centres).astype(np.float32))


def held_out_stills(clips: int, seed: int):
  """The stills `pretrain_vision(clips=clips, seed=seed)` scores the tower on (render_stills' arrays)."""
  return render_stills(max(clips // 10, 8), seed + 1)


class _Head(nnx.Module):
  """Linear read-outs of the flattened image Q-Former queries: colour, shape, centre (x, y)."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.out = nnx.Linear(width, 4 + 4 + 2, rngs=rngs)

  def __call__(self, queries):
    y = self.out(queries.reshape(queries.shape[0], -1))
    return y[:, :4], y[:, 4:8], y[:, 8:]


def pretrain_vision(branch, *, steps: int, batch_size: int, lr: float, seed: int, clips: int = 1000,
                    log=print) -> dict[str, float]:
  """Trains `branch.visual_encoder` and `branch.qformer` in place; returns held-out still-frame
  metrics (colour / shape accuracy, centre error in pixels)."""
  frames, colours, shapes, centres = render_stills(clips, seed)
  test = held_out_stills(clips, seed)
  q = branch.config.image_qformer
  head = _Head(q.num_query_tokens * q.hidden_size, rngs=nnx.Rngs(seed))
  tower = {name: getattr(branch, name) for name in TOWER}
  graphdef, params = nnx.split((tower, head))

  def predict(params, x):
    (tower, head) = nnx.merge(graphdef, params)
    return head(tower["qformer"](tower["visual_encoder"](x)))

  def loss_fn(params, x, colour, shape, centre):
    c, s, xy = predict(params, x)
    ce = optax.softmax_cross_entropy_with_integer_labels
    return jnp.mean(ce(c, colour)) + jnp.mean(ce(s, shape)) + POSITION_WEIGHT * jnp.mean(jnp.square(xy - centre))

  params, _ = fit(loss_fn, params, (frames, colours, shapes, centres), steps=steps, batch_size=batch_size, lr=lr,
                  warmup=max(steps // 10, 1), decay_steps=max(steps, 2), seed=seed,
                  progress="  vision step {step}/{steps}: loss {loss:.3f}", log=log)
  nnx.update((tower, head), params)
  c, s, xy = jax.jit(predict)(params, test[0])
  return {"colour": float(np.mean(np.argmax(c, -1) == test[1])),
          "shape": float(np.mean(np.argmax(s, -1) == test[2])),
          "centre_px": float(np.mean(np.abs(np.asarray(xy) - test[3])) * synthetic.SIZE / 2)}
