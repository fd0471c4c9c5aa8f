"""ImageBind audio / vision encoders vs the PyTorch reference (`imagebind-unofficial`, an installed test
dependency), its random state dict loaded through our converter; fp32, per-clip features."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vllama_jax.convert.imagebind import IGNORED, imagebind_key_map, imagebind_params, model_from_params
from vllama_jax.errors import CheckpointError, ConfigError
from vllama_jax.models.imagebind import ImageBindConfig, ImageBindEncoder, parameter_count

from imagebind_reference import reference_features, reference_model, state_dict  # setup.sh installs it

TOLERANCE = 1e-4
TINY_AUDIO = ImageBindConfig.tiny_audio(dtype="float32")
TINY_VISION = ImageBindConfig.tiny_vision(dtype="float32")


def stream(state):
  return (("imagebind_huge.pth", k, v) for k, v in state.items())


def run(model, x, **kwargs):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model(jnp.asarray(x), **kwargs))


@pytest.fixture(scope="module")
def tiny():
  reference = reference_model(TINY_AUDIO, TINY_VISION, audio_logit_scale=7.5)
  state = state_dict(reference)
  params = imagebind_params(stream(state), TINY_AUDIO, TINY_VISION)
  return reference, state, params


def check(cfg, reference, params, x):
  """x (B, S, C, H, W): our (B, S, out) against the reference's per-clip features."""
  got = run(model_from_params(cfg, params), x)
  expected = reference_features(reference, cfg.modality, x.reshape(-1, *x.shape[2:])).reshape(got.shape)
  assert got.dtype == np.float32
  assert np.abs(got - expected).max() <= TOLERANCE
  return got


def test_tiny_audio_matches_reference(tiny, rng):
  reference, _, params = tiny
  x = rng.standard_normal((2, 3, 1, *TINY_AUDIO.input_size)).astype(np.float32)
  got = check(TINY_AUDIO, reference, params["audio"], x)
  assert got.shape == (2, 3, TINY_AUDIO.out_dim)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 7.5, atol=1e-4)  # the checkpoint's buffer
  assert np.abs(got[:, 0] - got[:, 1]).max() > 1e-2  # clips stay apart: no averaging


def test_tiny_vision_matches_reference(tiny, rng):
  reference, _, params = tiny
  x = rng.standard_normal((2, 2, 3, 224, 224)).astype(np.float32)
  got = check(TINY_VISION, reference, params["vision"], x)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_real_widths_two_blocks_match_reference(rng):
  audio = ImageBindConfig.audio(depth=2, dtype="float32")
  vision = ImageBindConfig.vision(depth=2, dtype="float32")
  reference = reference_model(audio, vision, seed=1)
  params = imagebind_params(stream(state_dict(reference)), audio, vision)
  got = check(audio, reference, params["audio"], rng.standard_normal((1, 2, 1, 128, 204)).astype(np.float32))
  assert got.shape == (1, 2, 1024)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 20.0, atol=1e-4)
  got = check(vision, reference, params["vision"], rng.standard_normal((1, 1, 3, 224, 224)).astype(np.float32))
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_presets():
  audio, vision = ImageBindConfig.audio(), ImageBindConfig.vision()
  assert audio.grid == (12, 19) and audio.num_positions == 229 and audio.dtype == "bfloat16"
  assert vision.grid == (16, 16) and vision.num_positions == 257
  assert audio.drop_path_rates()[-1] == pytest.approx(0.1) and audio.drop_path_rates()[0] == 0.0
  # imagebind_huge.pth's audio keys hold 86,235,649 numbers; its vision keys 632,829,440, less the
  # folded Conv3d time axis (1280 * 3 * 14 * 14).
  assert parameter_count(audio) == 86_235_649
  assert parameter_count(vision) == 632_829_440 - 1280 * 3 * 14 * 14
  with pytest.raises(ConfigError):
    ImageBindConfig.audio(heads=7)
  with pytest.raises(ConfigError):
    ImageBindConfig(modality="text")


def test_one_modality_ignores_the_other(tiny, rng):
  reference, state, _ = tiny
  params = imagebind_params(stream(state), audio_cfg=TINY_AUDIO)
  assert set(params) == {"audio"}
  prefixed = {"audio_encoder." + k: v for k, v in state.items()}
  params = imagebind_params(stream(prefixed), vision_cfg=TINY_VISION, prefix="audio_encoder.")
  assert set(params) == {"vision"}


def test_other_modalities_are_ignored_on_purpose(tiny):
  _, state, _ = tiny
  rules = imagebind_key_map(TINY_AUDIO, TINY_VISION)
  others = [k for k in state if k not in rules]
  assert others and all(any(p.fullmatch(k) for p in IGNORED) for k in others)
  assert {k.split(".")[1] for k in others} == {"text", "depth", "thermal", "imu"}
  assert "modality_preprocessors.text.mask" in others  # a buffer


def test_converter_errors_name_the_key(tiny):
  _, state, _ = tiny
  broken = dict(state)
  broken.pop("modality_trunks.audio.blocks.1.attn.bias_v")
  broken["modality_trunks.audio.blocks.0.attn.extra"] = np.zeros(3, np.float32)
  broken["modality_heads.audio.2.weight"] = np.zeros((5, TINY_AUDIO.width), np.float32)
  with pytest.raises(CheckpointError) as error:
    imagebind_params(stream(broken), TINY_AUDIO, TINY_VISION, source="imagebind_huge.pth")
  message = str(error.value)
  assert "unexpected keys: modality_trunks.audio.blocks.0.attn.extra" in message
  assert "missing keys: modality_trunks.audio.blocks.1.attn.bias_v" in message
  assert "modality_heads.audio.2.weight (in imagebind_huge.pth) has shape (5, 48)" in message
  with pytest.raises(CheckpointError, match=r"in_proj_weight .* has shape \(3, 3\)"):
    wrong = dict(state, **{"modality_trunks.vision.blocks.0.attn.in_proj_weight": np.zeros((3, 3), np.float32)})
    imagebind_params(stream(wrong), TINY_AUDIO, TINY_VISION)
  with pytest.raises(ConfigError):
    imagebind_params(stream(state), audio_cfg=TINY_VISION)


def test_drop_path_only_in_training(tiny, rng):
  _, _, params = tiny
  model = model_from_params(TINY_AUDIO.replace(drop_path=0.5), params["audio"])
  x = rng.standard_normal((4, 2, 1, *TINY_AUDIO.input_size)).astype(np.float32)
  eval_out = run(model, x)
  np.testing.assert_array_equal(eval_out, run(model, x, deterministic=True, rngs=nnx.Rngs(dropout=0)))
  one = run(model, x, deterministic=False, rngs=nnx.Rngs(dropout=0))
  two = run(model, x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert np.abs(one - two).max() > 1e-3 and np.abs(one - eval_out).max() > 1e-3
  np.testing.assert_allclose(np.linalg.norm(one, axis=-1), 7.5, atol=1e-4)
  with pytest.raises(ValueError, match="dropout"):
    model(jnp.asarray(x), deterministic=False)
  # Vision has no drop path: training mode is the identity there.
  vision = model_from_params(TINY_VISION, params["vision"])
  frames = rng.standard_normal((1, 1, 3, 224, 224)).astype(np.float32)
  np.testing.assert_array_equal(run(vision, frames), run(vision, frames, deterministic=False))


def test_bfloat16_remat_and_shape_errors(tiny, rng):
  _, _, params = tiny
  x = rng.standard_normal((1, 2, 1, *TINY_AUDIO.input_size)).astype(np.float32)
  exact = run(model_from_params(TINY_AUDIO, params["audio"]), x)
  cfg = TINY_AUDIO.replace(dtype="bfloat16", remat=True)
  bf16 = imagebind_params(stream(tiny[1]), audio_cfg=cfg)["audio"]
  assert bf16["blocks"]["mlp"]["fc1"]["kernel"].dtype == jnp.bfloat16
  assert bf16["log_logit_scale"].dtype == np.float32 and math.isclose(float(bf16["log_logit_scale"]), math.log(7.5),
                                                                       rel_tol=1e-6)
  got = np.asarray(jax.jit(lambda m, v: m(v))(model_from_params(cfg, bf16), jnp.asarray(x)))
  assert got.dtype == np.float32 and np.abs(got - exact).max() < 0.5
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 7.5, atol=1e-3)
  grads = nnx.grad(lambda m: m(jnp.asarray(x), deterministic=False, rngs=nnx.Rngs(dropout=0)).sum())(
      model_from_params(TINY_AUDIO, params["audio"]))
  assert np.isfinite(np.asarray(grads["blocks"]["mlp"]["fc1"]["kernel"][...])).all()
  with pytest.raises(ValueError, match="expected audio input"):
    ImageBindEncoder(TINY_AUDIO, rngs=nnx.Rngs(0))(jnp.zeros((1, 2, 1, 32, 45)))
