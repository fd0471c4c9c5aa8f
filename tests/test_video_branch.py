"""The whole vision-language branch vs a PyTorch composition of the transformers references.

The glue (frame position embedding added to every query of its frame, flatten frames x queries,
video Q-Former, llama_proj) is written here from the spec, independently of our module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from test_eva_vit import hf_vision, lavis_state_dict
from test_qformer import hf_qformer, lavis_tensors
from vllama_jax import sharding
from vllama_jax.convert.eva import eva_vit_params
from vllama_jax.convert.qformer import IMAGE_KEYS, VIDEO_KEYS, convert_qformer
from vllama_jax.errors import ConfigError
from vllama_jax.models.eva_vit import EvaVitConfig
from vllama_jax.models.qformer import QFormerConfig
from vllama_jax.models.video_branch import VideoBranch, VideoBranchConfig

TOLERANCE = 1e-4


class TorchVideoBranch(torch.nn.Module):
  """Video-LLaMA's encode_videoQformer_visual, composed from transformers modules."""

  def __init__(self, cfg: VideoBranchConfig, seed=0):
    super().__init__()
    self.vision = hf_vision(cfg.vit, seed)
    self.image_qformer = hf_qformer(cfg.image_qformer, seed + 1)
    self.video_qformer = hf_qformer(cfg.video_qformer, seed + 2)
    generator = torch.Generator().manual_seed(seed + 3)
    width = cfg.image_qformer.hidden_size
    self.frame_positions = torch.nn.Embedding(cfg.max_frames, width)
    self.llama_proj = torch.nn.Linear(width, cfg.llm_hidden_size)
    with torch.no_grad():
      self.frame_positions.weight.normal_(generator=generator)
      self.llama_proj.bias.normal_(0, 0.1, generator=generator)
    self.image_keys = lavis_tensors(self.image_qformer, cfg.image_qformer, IMAGE_KEYS, seed + 4)
    self.video_keys = lavis_tensors(self.video_qformer, cfg.video_qformer, VIDEO_KEYS, seed + 5)

  def forward(self, frames):  # (B, T, 3, H, W)
    b, t = frames.shape[:2]
    image_embeds = self.vision(pixel_values=frames.flatten(0, 1)).last_hidden_state  # ln_vision applied
    image_tokens = self.image_keys[1]
    queries = self.image_qformer(query_embeds=image_tokens.expand(b * t, -1, -1),
                                 encoder_hidden_states=image_embeds).last_hidden_state
    queries = queries.reshape(b, t, queries.shape[1], -1)
    queries = queries + self.frame_positions(torch.arange(t))[None, :, None, :]
    queries = queries.reshape(b, -1, queries.shape[-1])
    video_tokens = self.video_keys[1]
    video = self.video_qformer(query_embeds=video_tokens.expand(b, -1, -1),
                               encoder_hidden_states=queries).last_hidden_state
    return self.llama_proj(video)


def ours_from(reference: TorchVideoBranch, cfg: VideoBranchConfig) -> VideoBranch:
  """Our branch with the reference's weights, each module through its converter."""
  eva = eva_vit_params(cfg.vit, (("eva.pth", k, v) for k, v in lavis_state_dict(reference.vision, cfg.vit).items()))
  params = {
      "visual_encoder": eva,
      "qformer": convert_qformer(cfg.image_qformer, reference.image_keys[0], *IMAGE_KEYS),
      "video_qformer": convert_qformer(cfg.video_qformer, reference.video_keys[0], *VIDEO_KEYS),
      "frame_position_embedding": reference.frame_positions.weight.detach().numpy(),
      "llama_proj": {"kernel": reference.llama_proj.weight.detach().numpy().T,
                     "bias": reference.llama_proj.bias.detach().numpy()},
  }
  graphdef, state = sharding.abstract_model(lambda: VideoBranch(cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def compare(ours, reference, frames):
  with torch.no_grad():
    expected = reference(torch.tensor(frames.transpose(0, 1, 4, 2, 3))).numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda m, x: m(x))(ours, jnp.asarray(frames)))
  assert got.shape == expected.shape and got.dtype == np.float32
  return np.abs(got - expected).max()


@pytest.fixture(scope="module")
def tiny():
  cfg = VideoBranchConfig.tiny()
  reference = TorchVideoBranch(cfg).eval()
  return cfg, reference, ours_from(reference, cfg)


@pytest.mark.parametrize("frames", [1, 4, 8])
def test_tiny_branch_matches_the_pytorch_composition(tiny, frames):
  cfg, reference, ours = tiny
  pixels = np.random.default_rng(frames).normal(size=(2, frames, 28, 28, 3)).astype(np.float32)
  assert compare(ours, reference, pixels) <= TOLERANCE


def test_real_widths_few_layers_match(rng):
  cfg = VideoBranchConfig(
      vit=EvaVitConfig.vit_g(depth=1, dtype="float32"),
      image_qformer=QFormerConfig.image(num_layers=2),
      video_qformer=QFormerConfig.video(),
      llm_hidden_size=4096)
  reference = TorchVideoBranch(cfg, seed=7).eval()
  pixels = rng.normal(size=(1, 4, 224, 224, 3)).astype(np.float32)
  assert compare(ours_from(reference, cfg), reference, pixels) <= TOLERANCE


def test_without_distinct_positions_frame_order_is_invisible(tiny):
  """The frozen encoders see each frame alone, and the video Q-Former's cross-attention is blind to
  key order: with one position row repeated, reversing the frames cannot change the output. (That
  the real rows are added per frame, to every query, is checked by the parity tests above.)"""
  cfg, _, ours = tiny
  pixels = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 28, 28, 3)).astype(np.float32))
  reversed_pixels = pixels[:, ::-1]
  np.testing.assert_allclose(np.asarray(ours.frame_features(reversed_pixels)[0, 0]),
                             np.asarray(ours.frame_features(pixels)[0, 2]), atol=1e-6)
  loud = nnx.clone(ours)  # strong rows, so that order visibly matters with them
  loud.frame_position_embedding[...] = 300 * loud.frame_position_embedding[...]
  assert np.abs(np.asarray(loud(pixels)) - np.asarray(loud(reversed_pixels))).max() > 1e-4
  loud.config = cfg.replace(use_frame_positions=False)  # the ablation's switch
  np.testing.assert_allclose(np.asarray(loud(pixels)), np.asarray(loud(reversed_pixels)), atol=2e-6)
  graphdef, state = nnx.split(ours)
  flat = nnx.merge(graphdef, state)  # a copy whose table has one row repeated
  flat.frame_position_embedding[...] = jnp.broadcast_to(state["frame_position_embedding"][...][:1],
                                                        state["frame_position_embedding"][...].shape)
  np.testing.assert_allclose(np.asarray(flat(pixels)), np.asarray(flat(reversed_pixels)), atol=1e-5)


def test_more_frames_than_the_table_is_an_error_unless_interpolating(tiny):
  cfg, _, ours = tiny
  pixels = jnp.zeros((1, cfg.max_frames + 1, 28, 28, 3))
  with pytest.raises(ConfigError, match=r"9 frames, but the frame position table has 8 rows"):
    ours(pixels)
  ours.config = cfg.replace(interpolate_frame_positions=True)
  try:
    table = np.asarray(ours.frame_position_embedding[...])
    resampled = np.asarray(ours.frame_positions(15))
    np.testing.assert_allclose(resampled[0], table[0], atol=1e-6)
    np.testing.assert_allclose(resampled[-1], table[-1], atol=1e-6)
    np.testing.assert_allclose(resampled[1], (table[0] + table[1]) / 2, atol=1e-6)  # 15 = 2·8 − 1
    assert ours(jnp.zeros((1, 15, 28, 28, 3))).shape == (1, cfg.video_qformer.num_query_tokens, 64)
    np.testing.assert_array_equal(np.asarray(ours.frame_positions(5)), table[:5])
  finally:
    ours.config = cfg


def test_initialisation_follows_the_reference():
  branch = VideoBranch(VideoBranchConfig.tiny(max_frames=64), rngs=nnx.Rngs(3))
  table = np.asarray(branch.frame_position_embedding[...])
  assert abs(table.std() - 1.0) < 0.1  # nn.Embedding default N(0, 1)
  kernel = np.asarray(branch.video_qformer.layers[0].attention.query.kernel[...])
  assert abs(kernel.std() - 0.02) < 0.003  # BERT init N(0, 0.02)
  bound = 32 ** -0.5  # nn.Linear default: U(-1/sqrt(in), 1/sqrt(in))
  proj = np.asarray(branch.llama_proj.kernel[...])
  assert proj.min() >= -bound and proj.max() <= bound and proj.std() > bound / 3


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1)])
def test_sharded_branch_matches_one_device(tiny, shape):
  cfg, _, ours = tiny
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=(8, 2, 28, 28, 3)).astype(np.float32))
  single = np.asarray(ours(pixels))
  mesh = sharding.make_mesh(shape)
  graphdef, state = nnx.split(ours)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  with jax.set_mesh(mesh):
    sharded = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, pixels)
  assert np.abs(np.asarray(sharded) - single).max() <= 1e-5


def test_frozen_parts_in_bfloat16_trainable_in_float32():
  cfg = VideoBranchConfig.tiny()
  cfg = cfg.replace(vit=cfg.vit.replace(dtype="bfloat16"), image_qformer=cfg.image_qformer.replace(dtype="bfloat16"))
  branch = VideoBranch(cfg, rngs=nnx.Rngs(0))
  assert branch.visual_encoder.patch_embed.kernel[...].dtype == jnp.bfloat16
  assert branch.video_qformer.query_tokens[...].dtype == jnp.float32
  assert branch.frame_position_embedding[...].dtype == jnp.float32
  out = branch(jnp.zeros((1, 2, 28, 28, 3)))
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
