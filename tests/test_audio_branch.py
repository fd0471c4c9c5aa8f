"""The whole audio branch vs a PyTorch composition: ImageBind (imagebind-unofficial) per-clip
features + audio position embedding + transformers' Blip2QFormerModel + llama_proj, glue written
here from the spec. Both the inference path (audio) and the paper's training path (frames through
ImageBind's vision tower)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from imagebind_reference import reference_features, reference_model, state_dict
from test_qformer import hf_qformer, lavis_tensors
from vllama_jax import sharding
from vllama_jax.convert.imagebind import imagebind_params
from vllama_jax.convert.qformer import AUDIO_KEYS, convert_qformer
from vllama_jax.errors import ConfigError
from vllama_jax.models.audio_branch import AudioBranch, AudioBranchConfig
from vllama_jax.models.imagebind import ImageBindConfig
from vllama_jax.models.qformer import QFormerConfig

TOLERANCE = 1e-4
CFG = AudioBranchConfig(audio=ImageBindConfig.tiny_audio(dtype="float32"),
                        vision=ImageBindConfig.tiny_vision(dtype="float32"),
                        qformer=QFormerConfig.tiny(encoder_width=32, num_layers=2, cross_attention_freq=1),
                        llm_hidden_size=64)


@pytest.fixture(scope="module")
def branches():
  """(torch parts, our AudioBranch) with the same weights, ours through our converters."""
  imagebind = reference_model(CFG.audio, CFG.vision, seed=3)
  qformer = hf_qformer(CFG.qformer, seed=4)
  qformer_tensors, query_tokens = lavis_tensors(qformer, CFG.qformer, AUDIO_KEYS, seed=5)
  generator = torch.Generator().manual_seed(6)
  positions = torch.randn(CFG.num_positions, CFG.qformer.encoder_width, generator=generator)
  proj = torch.nn.Linear(CFG.qformer.hidden_size, CFG.llm_hidden_size)
  encoders = imagebind_params((("imagebind_huge.pth", k, v) for k, v in state_dict(imagebind).items()),
                              CFG.audio, CFG.vision)
  params = {"audio_encoder": encoders["audio"], "vision_encoder": encoders["vision"],
            "audio_position_embedding": positions.numpy(),
            "audio_qformer": convert_qformer(CFG.qformer, qformer_tensors, *AUDIO_KEYS),
            "audio_llama_proj": {"kernel": proj.weight.detach().numpy().T, "bias": proj.bias.detach().numpy()}}
  graphdef, state = sharding.abstract_model(lambda: AudioBranch(CFG, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  torch_parts = dict(imagebind=imagebind, qformer=qformer, tokens=query_tokens, positions=positions, proj=proj)
  return torch_parts, nnx.merge(graphdef, state)


def torch_branch(parts, modality, x):
  """encode_audioQformer: per-clip ImageBind features + position rows -> audio Q-Former -> projection."""
  b, s = x.shape[:2]
  features = reference_features(parts["imagebind"], modality, x.reshape(b * s, *x.shape[2:]))
  features = torch.tensor(features).reshape(b, s, -1) + parts["positions"][:s][None]
  with torch.no_grad():
    queries = parts["qformer"](query_embeds=parts["tokens"].expand(b, -1, -1),
                               encoder_hidden_states=features).last_hidden_state
    return parts["proj"](queries).numpy()


@pytest.mark.parametrize("clips", [8, 3])
def test_audio_path_matches_the_pytorch_composition(branches, clips, rng):
  parts, ours = branches
  x = rng.standard_normal((2, clips, 1, *CFG.audio.input_size)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda m, f: m.encode_audio(f))(ours, jnp.asarray(x)))
  assert got.shape == (2, CFG.qformer.num_query_tokens, 64)
  assert np.abs(got - torch_branch(parts, "audio", x)).max() <= TOLERANCE


def test_frame_path_matches_the_pytorch_composition(branches, rng):
  parts, ours = branches
  frames = rng.standard_normal((1, 4, 224, 224, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours.encode_frames(jnp.asarray(frames)))
  expected = torch_branch(parts, "vision", frames.transpose(0, 1, 4, 2, 3))
  assert np.abs(got - expected).max() <= TOLERANCE


def test_audio_embeddings_have_norm_of_the_logit_scale_and_frames_norm_one(branches, rng):
  """The quirk the release carries: the Q-Former trains on unit-norm vision embeddings and runs on
  audio embeddings scaled by ImageBind's logit scale (20 in the released file)."""
  _, ours = branches
  audio = ours.audio_encoder(jnp.asarray(rng.standard_normal((1, 2, 1, *CFG.audio.input_size)), jnp.float32))
  frames = ours.vision_encoder(jnp.asarray(rng.standard_normal((1, 2, 3, 224, 224)), jnp.float32))
  scale = float(np.exp(np.asarray(ours.audio_encoder.log_logit_scale[...])))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(audio), axis=-1), min(scale, 100.0), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(frames), axis=-1), 1.0, rtol=1e-5)


def test_more_than_eight_segments_and_bad_configs_are_errors(branches):
  _, ours = branches
  with pytest.raises(ConfigError, match="9 audio segments, but the audio position table has 8 rows"):
    ours.encode_audio(jnp.zeros((1, 9, 1, *CFG.audio.input_size)))
  with pytest.raises(ConfigError, match="needs the ImageBind vision config"):
    CFG.replace(vision=None)
  with pytest.raises(ConfigError, match="train_on 'video'"):
    CFG.replace(train_on="video")
  audio_only = AudioBranch(CFG.replace(vision=None, train_on="audio"), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="no ImageBind vision encoder"):
    audio_only.encode_frames(jnp.zeros((1, 2, 224, 224, 3)))


def test_release_config_matches_the_spec():
  cfg = AudioBranchConfig.release(4096)
  assert (cfg.audio.width, cfg.audio.depth, cfg.audio.out_dim) == (768, 12, 1024)
  assert (cfg.vision.width, cfg.vision.depth) == (1280, 32)
  assert (cfg.qformer.num_layers, cfg.qformer.encoder_width, cfg.qformer.num_query_tokens) == (2, 1024, 8)
  assert cfg.train_on == "vision"
