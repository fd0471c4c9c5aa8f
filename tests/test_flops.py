"""Matmul FLOPs counted on the jaxpr: exact for dots and convs, scans counted `length` times."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vllama_jax.config import llama_preset
from vllama_jax.models.eva_vit import EvaBlock
from vllama_jax.models.llama import Llama
from vllama_jax.models.video_llama import VideoLLaMA, VideoLlamaConfig
from vllama_jax.train.flops import count_flops
from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer
from vllama_jax.train.step import init_train_state, make_train_step
from vllama_jax.train.trainable import split_trainable

f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731


def xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_matmul_is_2mnk():
  m, k, n = 3, 5, 7
  assert count_flops(jnp.matmul, f32(m, k), f32(k, n)) == 2 * m * n * k
  assert xla_flops(jnp.matmul, f32(m, k), f32(k, n)) == 2 * m * n * k


def test_batched_einsum():
  b, h, q, s, d = 2, 3, 4, 5, 6
  scores = lambda x, y: jnp.einsum("bqhd,bshd->bhqs", x, y)  # noqa: E731
  assert count_flops(scores, f32(b, q, h, d), f32(b, s, h, d)) == 2 * b * h * q * s * d


def test_value_and_grad_of_a_matmul_is_three_matmuls():
  loss = lambda a, b: jnp.sum(a @ b)  # noqa: E731
  args = f32(3, 5), f32(5, 7)
  assert count_flops(jax.value_and_grad(loss, argnums=(0, 1)), *args) == 3 * count_flops(loss, *args)


def test_scan_counts_its_body_length_times():
  layers, b, d = 5, 2, 8
  layer = lambda h, w: jnp.tanh(h @ w)  # noqa: E731

  def stack(h, ws, remat=False):
    body = jax.checkpoint(layer) if remat else layer
    return jax.lax.scan(lambda h, w: (body(h, w), None), h, ws)[0]

  one = count_flops(layer, f32(b, d), f32(d, d))
  assert one == 2 * b * d * d
  assert count_flops(stack, f32(b, d), f32(layers, d, d)) == layers * one
  for remat, matmuls in ((False, 3), (True, 4)):  # remat runs each layer's forward again
    grad = jax.grad(lambda h, ws: stack(h, ws, remat).sum(), argnums=(0, 1))
    assert count_flops(grad, f32(b, d), f32(layers, d, d)) == matmuls * layers * one


def test_cond_takes_the_larger_branch_and_while_its_body_once():
  x = f32(4, 4)
  assert count_flops(lambda a: jax.lax.cond(a[0, 0] > 0, lambda a: a @ a @ a, lambda a: a, a), x) == 2 * 128
  loop = lambda a: jax.lax.while_loop(lambda c: c[0] < 9, lambda c: (c[0] + 1, c[1] @ c[1]), (0, a))  # noqa: E731
  assert count_flops(loop, x) == 128


def conv(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_conv_counts_multiply_adds_of_real_inputs():
  n, size, patch, c, o = 2, 12, 4, 3, 5
  patches = (size // patch) ** 2
  x, w = f32(n, size, size, c), f32(patch, patch, c, o)
  # A patch embedding: one (patches, patch² c) x (patch² c, o) matmul per image.
  assert count_flops(lambda x, w: conv(x, w, (patch, patch), "VALID"), x, w) == 2 * n * patches * patch ** 2 * c * o
  # Padding taps do not count, nor the holes of the dilated input in a strided conv's gradient.
  same = lambda x, w: conv(x, w, (2, 3), "SAME").sum()  # noqa: E731
  forward = count_flops(same, x, w)
  assert forward == xla_flops(same, x, w) - n * 6 * 4 * o + 1  # XLA adds the sum's n·6·4·o - 1 adds
  assert count_flops(jax.value_and_grad(same, argnums=(0, 1)), x, w) == 3 * forward


def llama(scan_layers: bool, remat: bool = False, num_layers: int = 3) -> Llama:
  cfg = llama_preset("tiny", num_layers=num_layers, scan_layers=scan_layers, remat=remat)
  return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_llama_counts_like_its_layer_list(remat):
  ids = jax.ShapeDtypeStruct((2, 9), jnp.int32)

  def loss(scan_layers, num_layers=3):
    graphdef, state = nnx.split(llama(scan_layers, remat, num_layers))
    value = lambda s, ids: nnx.merge(graphdef, s)(ids).sum()  # noqa: E731
    return count_flops(jax.value_and_grad(value), state, ids)

  assert loss(True) == loss(False)
  assert loss(True) - loss(True, num_layers=1) == 2 * (loss(True, num_layers=2) - loss(True, num_layers=1)) > 0


B, L, T, SIZE, VOCAB = 2, 12, 2, 28, 64


def train_step_flops(llama_layers: int, scan_layers: bool, vit_depth: int, accum_steps: int = 1) -> int:
  cfg = VideoLlamaConfig.tiny(vocab_size=VOCAB)
  v = cfg.video
  cfg = cfg.replace(audio=None, llama=cfg.llama.replace(num_layers=llama_layers, scan_layers=scan_layers),
                    video=v.replace(vit=v.vit.replace(image_size=SIZE, depth=vit_depth)))
  model = nnx.eval_shape(lambda: VideoLLaMA(cfg, rngs=nnx.Rngs(0)))
  graphdef, trainable, frozen = split_trainable(model, "vl")
  optimizer = make_optimizer(OptimizerConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=None, warmup_steps=0,
                                             iters_per_epoch=10, max_epoch=1))
  step = make_train_step(graphdef, frozen, optimizer, "video", accum_steps=accum_steps)
  state = jax.eval_shape(lambda p: init_train_state(p, optimizer), trainable)
  ints = jax.ShapeDtypeStruct((B, L), jnp.int32)
  batch = {"ids": ints, "source": ints, "labels": ints, "attention_mask": ints, "frames": f32(B, T, SIZE, SIZE, 3)}
  return step.flops(state, batch)


def test_train_step_counts_every_scanned_layer():
  scanned = train_step_flops(3, True, vit_depth=3)
  assert scanned == train_step_flops(3, False, vit_depth=3)
  assert scanned == train_step_flops(3, True, vit_depth=3, accum_steps=2)  # a scan over microbatches
  # The frozen EVA runs forward only: each block adds one block's forward on the B·T frames.
  vit = VideoLlamaConfig.tiny(vocab_size=VOCAB).video.vit.replace(image_size=SIZE)
  block = nnx.eval_shape(lambda: EvaBlock(vit, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(block)
  one_block = count_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, f32(B * T, vit.num_positions, vit.width))
  assert scanned - train_step_flops(3, True, vit_depth=1) == 2 * one_block > 0
