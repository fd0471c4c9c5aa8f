"""The jitted train step on a tiny Video-LLaMA: what changes, the loss, skips, accumulation, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vllama_jax.models.video_llama import VideoLLaMA, VideoLlamaConfig
from vllama_jax.pretrained import unstack_layers
from vllama_jax.sharding import make_mesh
from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer
from vllama_jax.train.step import init_train_state, make_eval_step, make_train_step
from vllama_jax.train.trainable import count_params, split_trainable

B, L, T, SIZE, VOCAB = 4, 16, 2, 28, 64
QUERIES = 6  # the tiny video Q-Former's query tokens


def tiny_config() -> VideoLlamaConfig:
  """One layer everywhere and 28-pixel frames: compiles fast."""
  cfg = VideoLlamaConfig.tiny(vocab_size=VOCAB)
  v = cfg.video
  return cfg.replace(audio=None, llama=cfg.llama.replace(num_layers=1),
                     video=v.replace(vit=v.vit.replace(image_size=SIZE, depth=1),
                                     image_qformer=v.image_qformer.replace(num_layers=1),
                                     video_qformer=v.video_qformer.replace(num_layers=1)))


def make_batch(seed=0) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, (B, L))
  source = np.full((B, L), -1)
  source[:, 1:1 + QUERIES] = np.arange(QUERIES)
  ids[:, 1:1 + QUERIES] = 0
  lengths = np.array([16, 12, 10, 9])  # right padding; microbatches {0, 2} and {1, 3} differ in tokens
  mask = np.arange(L)[None] < lengths[:, None]
  labels = np.where((np.arange(L)[None] > QUERIES) & mask, ids, -100)
  return {"ids": jnp.asarray(ids, jnp.int32), "source": jnp.asarray(source, jnp.int32),
          "labels": jnp.asarray(labels, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32),
          "frames": jnp.asarray(rng.normal(size=(B, T, SIZE, SIZE, 3)), jnp.float32),
          "weight": jnp.ones((B,), jnp.float32)}


def numpy_tree(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def setup():
  model = VideoLLaMA(tiny_config(), rngs=nnx.Rngs(0))
  graphdef, trainable, frozen = split_trainable(model, "vl")
  optimizer = make_optimizer(OptimizerConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=None, warmup_steps=0,
                                             iters_per_epoch=10, max_epoch=1))
  return graphdef, trainable, frozen, optimizer


@pytest.fixture(scope="module")
def train_step(setup):
  graphdef, _, frozen, optimizer = setup
  return make_train_step(graphdef, frozen, optimizer, "video")


@pytest.fixture(scope="module")
def plain_run(setup):
  """Two steps without dropout on one device: (losses, params) that other setups must reproduce."""
  graphdef, trainable, frozen, optimizer = setup
  step = make_train_step(graphdef, frozen, optimizer, "video", dropout=False)
  losses, state = two_steps(step, init_train_state(trainable, optimizer))
  return losses, numpy_tree(state.params)


def two_steps(step, state):
  """(losses, state) after the steps on batches 0 and 1."""
  losses = []
  for seed in (0, 1):
    state, metrics = step(state, make_batch(seed))
    losses.append(float(metrics["loss"]))
  return losses, state


def assert_same_run(losses, state, plain_run, tol):
  np.testing.assert_allclose(losses, plain_run[0], rtol=tol)
  for ours, ref in zip(numpy_tree(state.params), plain_run[1]):
    np.testing.assert_allclose(ours, ref, atol=tol)


def test_only_trainables_change_and_have_optimizer_state(setup, train_step):
  _, trainable, frozen, optimizer = setup
  frozen_before, trainable_before = numpy_tree(frozen), numpy_tree(trainable)
  state = init_train_state(trainable, optimizer, seed=0)
  batch = make_batch()
  losses = []
  for _ in range(3):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
    assert int(metrics["skipped"]) == 0 and float(metrics["tokens"]) == 4 * 0 + 9 + 5 + 3 + 2
  assert losses[-1] < losses[0]
  for before, after in zip(frozen_before, numpy_tree(frozen)):
    np.testing.assert_array_equal(before, after)  # bit-identical
  for before, after in zip(trainable_before, numpy_tree(state.params)):
    assert not np.array_equal(before, after)
  # Adam's two moments per trainable tensor, nothing for the frozen weights.
  moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == sorted(2 * [x.shape for x in jax.tree.leaves(trainable)])
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) - 1 == 2 * count_params(trainable)
  assert int(state.step) == 3 and int(state.skipped) == 0


def test_dropout_is_active_and_seeded(setup, train_step):
  _, trainable, _, optimizer = setup
  batch = make_batch()
  loss = lambda seed: float(train_step(init_train_state(trainable, optimizer, seed), batch)[1]["loss"])
  assert loss(0) == loss(0)
  assert loss(0) != loss(1)


def test_nonfinite_or_empty_batch_is_skipped(setup, train_step):
  _, trainable, _, optimizer = setup
  state, _ = train_step(init_train_state(trainable, optimizer), make_batch())
  poisoned = make_batch() | {"frames": make_batch()["frames"].at[1, 0, 3].set(jnp.inf)}
  empty = make_batch() | {"labels": jnp.full((B, L), -100, jnp.int32)}
  for i, batch in enumerate((poisoned, empty)):
    params, opt_state = numpy_tree(state.params), numpy_tree(state.opt_state)
    state, metrics = train_step(state, batch)
    assert int(metrics["skipped"]) == 1
    for before, after in zip(params + opt_state, numpy_tree(state.params) + numpy_tree(state.opt_state)):
      np.testing.assert_array_equal(before, after)
    assert int(state.step) == 2 + i and int(state.skipped) == 1 + i
  state, metrics = train_step(state, poisoned)
  assert not np.isfinite(float(metrics["loss"]))
  state, metrics = train_step(state, make_batch())  # training goes on
  assert int(metrics["skipped"]) == 0 and int(state.skipped) == 3


def test_loss_is_token_mean_cross_entropy(setup, plain_run):
  graphdef, trainable, frozen, _ = setup
  batch = make_batch() | {"weight": jnp.array([1.0, 1.0, 0.0, 1.0])}  # row 2 is filler
  evaluate = make_eval_step(graphdef, frozen, "video")
  metrics = evaluate(trainable, batch)

  @jax.jit
  def logits(trainable, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen)
    return model(batch["ids"], batch["source"], model.video_branch(batch["frames"]), batch["attention_mask"])

  out = torch.tensor(np.asarray(logits(trainable, frozen, batch)))
  labels = torch.tensor(np.asarray(batch["labels"]), dtype=torch.long)
  rows = torch.tensor([0, 1, 3])
  expected = torch.nn.functional.cross_entropy(out[rows, :-1].reshape(-1, VOCAB), labels[rows, 1:].reshape(-1),
                                               ignore_index=-100)
  assert float(metrics["tokens"]) == 9 + 5 + 2
  np.testing.assert_allclose(float(metrics["loss"]), expected.item(), rtol=1e-5)
  # The train step's first loss (no dropout, initial params) is the same quantity on the full batch.
  full = evaluate(trainable, make_batch())
  np.testing.assert_allclose(plain_run[0][0], float(full["loss"]), rtol=1e-6)


def test_accumulation_matches_full_batch(setup, plain_run):
  graphdef, trainable, frozen, optimizer = setup
  step = make_train_step(graphdef, frozen, optimizer, "video", accum_steps=2, dropout=False)
  assert_same_run(*two_steps(step, init_train_state(trainable, optimizer)), plain_run, 1e-5)


def test_sharded_step_matches_single_device(setup, plain_run):
  graphdef, trainable, frozen, optimizer = setup
  mesh = make_mesh((2, 2, 2))
  step = make_train_step(graphdef, frozen, optimizer, "video", mesh, dropout=False)
  losses, state = two_steps(step, init_train_state(trainable, optimizer, mesh=mesh))
  specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
  assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  assert_same_run(losses, state, plain_run, 1e-5)


def test_llama_layers_as_a_list_train_as_the_scanned_ones(setup, plain_run):
  """A config's `scan_layers=False`: the frozen LLaMA's layers as a list, the same steps."""
  graphdef, trainable, frozen, optimizer = setup
  model = nnx.merge(graphdef, trainable, frozen)
  model.llama = unstack_layers(model.llama, make_mesh((1, 1, 1), jax.devices()[:1]))
  graphdef, trainable, frozen = split_trainable(model, "vl")
  assert not model.llama.config.scan_layers and count_params(trainable) == count_params(setup[1])
  step = make_train_step(graphdef, frozen, optimizer, "video", dropout=False)
  assert_same_run(*two_steps(step, init_train_state(trainable, optimizer)), plain_run, 1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_trains_as_without(setup, plain_run, scan_layers):
  """`remat=True`: the frozen LLaMA's layers run their forward again in the backward, same steps."""
  graphdef, trainable, frozen, optimizer = setup
  model = nnx.merge(graphdef, trainable, frozen)
  if not scan_layers:
    model.llama = unstack_layers(model.llama, make_mesh((1, 1, 1), jax.devices()[:1]))
  model.llama.config = model.llama.config.replace(remat=True)
  graphdef, trainable, frozen = split_trainable(model, "vl")
  step = make_train_step(graphdef, frozen, optimizer, "video", dropout=False)
  assert_same_run(*two_steps(step, init_train_state(trainable, optimizer)), plain_run, 1e-6)


AUDIO_QUERIES = 4  # the tiny audio Q-Former's query tokens


@pytest.fixture(scope="module")
def al_setup():
  """The AL stages' layout: the audio branch with ImageBind's vision tower, trained on frames."""
  from vllama_jax.models.imagebind import ImageBindConfig
  cfg = tiny_config()
  audio = VideoLlamaConfig.tiny(vocab_size=VOCAB).audio
  vision = ImageBindConfig.tiny_vision(input_size=(SIZE, SIZE), kernel_size=14, stride=14,
                                       out_dim=audio.audio.out_dim)
  audio = dataclasses.replace(audio, vision=vision, train_on="vision",
                              qformer=dataclasses.replace(audio.qformer, num_layers=1))
  model = VideoLLaMA(cfg.replace(audio=audio), rngs=nnx.Rngs(0))
  graphdef, trainable, frozen = split_trainable(model, "al")
  optimizer = make_optimizer(OptimizerConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=None, warmup_steps=0,
                                             iters_per_epoch=10, max_epoch=1))
  return graphdef, trainable, frozen, optimizer


def al_batch(seed=0) -> dict:
  batch = make_batch(seed)
  source = np.full((B, L), -1)
  source[:, 1:1 + AUDIO_QUERIES] = np.arange(AUDIO_QUERIES)  # the audio Q-Former's rows, then text
  return batch | {"source": jnp.asarray(source, jnp.int32)}


def test_al_stage_trains_the_audio_qformer_on_frames(al_setup):
  graphdef, trainable, frozen, optimizer = al_setup
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
  assert {p.split(".")[1] for p in paths} == {"audio_qformer", "audio_position_embedding", "audio_llama_proj"}
  frozen_before, trainable_before = numpy_tree(frozen), numpy_tree(trainable)
  step = make_train_step(graphdef, frozen, optimizer, "audio_vision", dropout=False)
  state, losses = init_train_state(trainable, optimizer), []
  for _ in range(3):
    state, metrics = step(state, al_batch())
    losses.append(float(metrics["loss"]))
    assert int(metrics["skipped"]) == 0
  assert losses[-1] < losses[0]
  for before, after in zip(frozen_before, numpy_tree(frozen)):  # ImageBind's towers, the video branch, the LLM
    np.testing.assert_array_equal(before, after)
  for before, after in zip(trainable_before, numpy_tree(state.params)):
    assert not np.array_equal(before, after)

  @jax.jit
  def logits(trainable, frozen, batch):  # the rows from the frames through ImageBind's vision tower
    model = nnx.merge(graphdef, trainable, frozen)
    rows = model.audio_branch.encode_frames(batch["frames"])
    return model(batch["ids"], batch["source"], rows, batch["attention_mask"])

  batch = al_batch()
  out = torch.tensor(np.asarray(logits(trainable, frozen, batch)))
  labels = torch.tensor(np.asarray(batch["labels"]), dtype=torch.long)
  expected = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
  np.testing.assert_allclose(losses[0], expected.item(), rtol=1e-5)
