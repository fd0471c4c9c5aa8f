"""EVA ViT-g + ln_vision vs transformers' Blip2VisionModel (same architecture, `post_layernorm` playing
`ln_vision`), its weights renamed to LAVIS keys and loaded through our converter; fp32."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vllama_jax.convert.eva import eva_vit_params, model_from_params
from vllama_jax.errors import CheckpointError
from vllama_jax.models.eva_vit import EvaVitConfig, parameter_count, resize_bicubic

TOLERANCE = 1e-4


def hf_vision(cfg: EvaVitConfig, seed=0):
  """A Blip2VisionModel shaped like `cfg`, every weight random (norms and biases too), k bias zero."""
  from transformers import Blip2VisionConfig, Blip2VisionModel
  torch.manual_seed(seed)
  config = Blip2VisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
                             num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                             qkv_bias=True, layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu",
                             attn_implementation="eager")
  model = Blip2VisionModel(config).eval()
  model.post_layernorm.eps = cfg.ln_vision_eps  # BLIP-2's ln_vision
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layernorm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      elif name.startswith("embeddings.") and p.ndim == 3:  # class and position embeddings
        p.copy_(0.5 * torch.randn_like(p))
      elif p.ndim >= 2:  # linear and conv weights, scaled for unit-variance outputs
        p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
      else:
        p.copy_(0.1 * torch.randn_like(p))
    for layer in model.encoder.layers:  # EVA has no k bias
      layer.self_attn.qkv.bias[cfg.width:2 * cfg.width] = 0
  return model


def lavis_state_dict(model, cfg: EvaVitConfig) -> dict[str, np.ndarray]:
  """The HF vision model's weights under LAVIS / EVA names (+ BLIP-2's `ln_vision`)."""
  w = cfg.width
  renames = [(r"embeddings\.class_embedding", "cls_token"), (r"embeddings\.position_embedding", "pos_embed"),
             (r"embeddings\.patch_embedding\.", "patch_embed.proj."), (r"encoder\.layers\.", "blocks."),
             (r"\.layer_norm(\d)\.", r".norm\1."), (r"\.self_attn\.projection\.", ".attn.proj."),
             (r"\.self_attn\.qkv\.", ".attn.qkv."), (r"post_layernorm\.", "ln_vision.")]
  out = {}
  for key, value in model.state_dict().items():
    for pattern, replacement in renames:
      key = re.sub(pattern, replacement, key)
    value = value.detach().numpy().copy()
    if key.endswith("attn.qkv.bias"):
      assert not value[w:2 * w].any()
      out[key.replace("qkv.bias", "q_bias")] = value[:w]
      out[key.replace("qkv.bias", "v_bias")] = value[2 * w:]
    else:
      out[key] = value
  return out


def load(cfg, state, **kwargs):
  return model_from_params(cfg, eva_vit_params(cfg, (("src.pth", k, v) for k, v in state.items()), **kwargs))


def max_diff(model, reference, pixels_nhwc, interpolate=False):
  with torch.no_grad():
    expected = reference(pixel_values=torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2)),
                         interpolate_pos_encoding=interpolate).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(pixels_nhwc)))
  assert got.shape == expected.shape and got.dtype == np.float32
  return np.abs(got - expected).max()


@pytest.fixture(scope="module")
def tiny():
  cfg = EvaVitConfig.tiny(dtype="float32")
  reference = hf_vision(cfg)
  return cfg, reference, lavis_state_dict(reference, cfg)


def test_tiny_matches_transformers(tiny, rng):
  cfg, reference, state = tiny
  pixels = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  assert max_diff(load(cfg, state), reference, pixels) <= TOLERANCE


def test_real_width_two_blocks_matches_transformers(rng):
  cfg = EvaVitConfig.vit_g(depth=2, dtype="float32")
  reference = hf_vision(cfg)
  model = load(cfg, lavis_state_dict(reference, cfg))
  pixels = rng.standard_normal((2, 224, 224, 3)).astype(np.float32)
  assert max_diff(model, reference, pixels) <= TOLERANCE


def test_other_resolutions_interpolate_positions_like_transformers(tiny, rng):
  cfg, reference, state = tiny
  model = load(cfg, state)
  np.testing.assert_array_equal(np.asarray(model.position_embeddings((2, 2))), np.asarray(model.pos_embed[...]))
  pixels = rng.standard_normal((2, 42, 56, 3)).astype(np.float32)  # 3×4 patches from a 2×2 table
  assert max_diff(model, reference, pixels, interpolate=True) <= TOLERANCE
  assert model(jnp.zeros((1, 70, 70, 3))).shape == (1, 1 + 25, cfg.width)


@pytest.mark.parametrize("size", [(26, 20), (8, 11), (16, 16)])
def test_resize_bicubic_matches_torch_interpolate(rng, size):
  table = rng.standard_normal((16, 16, 5)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.tensor(table).permute(2, 0, 1)[None], size=size,
                                             mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(np.asarray(resize_bicubic(jnp.asarray(table), size)), expected, atol=1e-5)


def test_remat_and_bfloat16_run(tiny, rng):
  cfg, _, state = tiny
  pixels = jnp.asarray(rng.standard_normal((2, 28, 28, 3)).astype(np.float32))
  with jax.default_matmul_precision("highest"):
    plain = np.asarray(load(cfg, state)(pixels))
    remat = np.asarray(load(cfg.replace(remat=True), state)(pixels))
  np.testing.assert_allclose(remat, plain, atol=1e-6)
  half = load(cfg.replace(dtype="bfloat16"), state)(pixels)
  assert half.dtype == jnp.bfloat16 and np.abs(np.asarray(half, np.float32) - plain).max() < 0.25


def test_extra_blocks_are_dropped_and_fp16_is_accepted(tiny):
  cfg, _, state = tiny
  extra = dict(state)
  extra |= {k.replace("blocks.1.", "blocks.2."): v for k, v in state.items() if k.startswith("blocks.1.")}
  extra |= {k.replace("blocks.1.", "blocks.39."): v for k, v in state.items() if k.startswith("blocks.1.")}
  half = {k: v.astype(np.float16) for k, v in extra.items()}
  params = eva_vit_params(cfg, (("eva_vit_g.pth", k, v) for k, v in half.items()))
  q_bias = params["blocks"]["attn"]["q"]["bias"]
  assert q_bias.dtype == np.float32
  np.testing.assert_array_equal(q_bias[1], state["blocks.1.attn.q_bias"].astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(params["blocks"]["attn"]["k"]["kernel"][0],
                                state["blocks.0.attn.qkv.weight"][cfg.width:2 * cfg.width].T.astype(np.float16))


def test_unknown_missing_and_misshaped_keys_are_named(tiny):
  cfg, _, state = tiny

  def error(source):
    with pytest.raises(CheckpointError) as info:
      eva_vit_params(cfg, (("src.pth", k, v) for k, v in source.items()), source="src.pth")
    return str(info.value)

  message = error(state | {"norm.weight": np.ones(cfg.width, np.float32)})
  assert "unexpected keys: norm.weight (in src.pth)" in message
  message = error({k: v for k, v in state.items() if k != "blocks.1.attn.v_bias"})
  assert "missing keys: blocks.1.attn.v_bias" in message
  message = error(state | {"blocks.0.attn.qkv.weight": np.zeros((3 * cfg.width + 3, cfg.width), np.float32)})
  assert f"blocks.0.attn.qkv.weight (in src.pth) has shape ({3 * cfg.width + 3}, {cfg.width})" in message
  message = error(state | {"blocks.0.attn.k_bias": np.zeros(cfg.width, np.float32)})
  assert "unexpected keys: blocks.0.attn.k_bias" in message


def test_vit_g_parameter_count():
  cfg = EvaVitConfig.vit_g()
  assert parameter_count(cfg, include_ln_vision=False) == 985_894_528
  assert parameter_count(cfg) == 985_894_528 + 2 * 1408


def test_vit_g_parameters_shard_by_logical_names():
  from flax import nnx
  from vllama_jax.models.eva_vit import EvaVisionTransformer
  from jax.sharding import PartitionSpec as P
  from vllama_jax.sharding import abstract_model, make_mesh, state_shardings
  _, state = abstract_model(lambda: EvaVisionTransformer(EvaVitConfig.vit_g(), rngs=nnx.Rngs(0)))
  shardings = nnx.to_pure_dict(state_shardings(state, make_mesh((2, 2, 2))))
  assert shardings["blocks"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert shardings["blocks"]["mlp"]["fc2"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert shardings["patch_embed"]["kernel"].spec == P(None, None, None, "fsdp")
