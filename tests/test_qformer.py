"""Our Q-Former vs transformers' Blip2QFormerModel, same weights through our LAVIS-key converter, fp32."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vllama_jax.convert import tree
from vllama_jax.convert.qformer import (AUDIO_KEYS, IGNORED_KEYS, IMAGE_KEYS, VIDEO_KEYS,
                                        abstract_params, convert_qformer, qformer_from_params,
                                        qformer_key_map)
from vllama_jax.errors import CheckpointError
from vllama_jax.models.qformer import QFormer, QFormerConfig

TOLERANCE = 1e-4

# Parameters of the stripped LAVIS Q-Formers (embeddings LayerNorm + layers, no query tokens); the
# same as transformers' Blip2QFormerModel with use_qformer_text_input=False.
STRIPPED_PARAMS = {"image": 105_137_664, "video": 18_905_088, "audio": 19_691_520}
PRESETS = {"image": (QFormerConfig.image, IMAGE_KEYS, 257),
           "video": (QFormerConfig.video, VIDEO_KEYS, 64),
           "audio": (QFormerConfig.audio, AUDIO_KEYS, 8)}


def hf_qformer(cfg: QFormerConfig, seed=0):
  """A transformers Blip2QFormerModel shaped like `cfg`, in eval mode, with every weight random
  (norm scales around 1, nonzero biases) so that nothing passes by being an identity or a zero."""
  from transformers import Blip2QFormerConfig, Blip2QFormerModel
  torch.manual_seed(seed)
  config = Blip2QFormerConfig(
      hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=cfg.encoder_width,
      layer_norm_eps=cfg.layer_norm_eps, use_qformer_text_input=False, hidden_act="gelu")
  config._attn_implementation = "eager"
  model = Blip2QFormerModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.startswith("layernorm"):
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.02 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.02)
  return model


def lavis_tensors(model, cfg: QFormerConfig, keys, seed=0):
  """The model's state dict renamed to LAVIS keys under `keys = (prefix, query_key)`, plus random
  query tokens and the `position_ids` buffer LAVIS checkpoints carry. Returns (triples, tokens)."""
  prefix, query_key = keys
  triples = [("model.pth", prefix + lavis_name(name), value.numpy())
             for name, value in model.state_dict().items()]
  generator = torch.Generator().manual_seed(seed)
  tokens = torch.randn(1, cfg.num_query_tokens, cfg.hidden_size, generator=generator)
  triples.append(("model.pth", query_key, tokens.numpy()))
  triples.append(("model.pth", prefix + "bert.embeddings.position_ids", np.arange(512)[None]))
  return triples, tokens


def lavis_name(hf_name: str) -> str:
  """transformers' Blip2QFormerModel parameter name -> LAVIS's (under `bert.`)."""
  if hf_name.startswith("layernorm."):
    hf_name = "bert.embeddings.LayerNorm." + hf_name[len("layernorm."):]
  elif hf_name.startswith("encoder."):
    hf_name = "bert." + hf_name
  return (hf_name.replace(".attention.attention.", ".attention.self.")
          .replace(".crossattention.attention.", ".crossattention.self."))


def run_both(model, tokens, ours, encoder_states, mask=None):
  enc = torch.tensor(encoder_states)
  with torch.no_grad():
    expected = model(query_embeds=tokens.expand(enc.shape[0], -1, -1), encoder_hidden_states=enc,
                     encoder_attention_mask=None if mask is None else torch.tensor(mask)
                     ).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours(jnp.asarray(encoder_states), None if mask is None else jnp.asarray(mask)))
  assert got.shape == expected.shape and got.dtype == np.float32
  return np.abs(got - expected).max()


def count(params) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


@pytest.mark.parametrize("preset", ["image", "video", "audio"])
def test_real_width_outputs_match_transformers(preset, rng):
  make, keys, seq = PRESETS[preset]
  cfg = make()
  reference = hf_qformer(cfg)
  hf_count = sum(p.numel() for p in reference.parameters())
  assert hf_count == STRIPPED_PARAMS[preset]
  triples, tokens = lavis_tensors(reference, cfg, keys)
  params = convert_qformer(cfg, triples, *keys, source=preset)
  assert count(params) == hf_count + cfg.num_query_tokens * cfg.hidden_size
  ours = qformer_from_params(cfg, params)
  encoder_states = rng.standard_normal((2, seq, cfg.encoder_width)).astype(np.float32)
  assert run_both(reference, tokens, ours, encoder_states) <= TOLERANCE


def test_tiny_with_encoder_padding_and_external_queries_matches_transformers(rng):
  cfg = QFormerConfig.tiny()
  reference = hf_qformer(cfg, seed=1)
  triples, tokens = lavis_tensors(reference, cfg, VIDEO_KEYS, seed=1)
  ours = qformer_from_params(cfg, convert_qformer(cfg, triples, *VIDEO_KEYS))
  encoder_states = rng.standard_normal((3, 7, cfg.encoder_width)).astype(np.float32)
  mask = (np.arange(7)[None] < np.array([[7], [4], [1]])).astype(np.int64)
  assert run_both(reference, tokens, ours, encoder_states, mask) <= TOLERANCE
  # padded encoder positions are really ignored
  noisy = encoder_states + 100.0 * (1 - mask)[..., None]
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(noisy), jnp.asarray(mask))),
                             np.asarray(ours(jnp.asarray(encoder_states), jnp.asarray(mask))), atol=1e-5)
  # external query embeddings (e.g. 5 of them, per batch row) replace the learned tokens
  queries = rng.standard_normal((3, 5, cfg.hidden_size)).astype(np.float32)
  with torch.no_grad():
    expected = reference(query_embeds=torch.tensor(queries),
                         encoder_hidden_states=torch.tensor(encoder_states)).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours(jnp.asarray(encoder_states), query_embeds=jnp.asarray(queries)))
  assert np.abs(got - expected).max() <= TOLERANCE


def fake_tensors(cfg, keys):
  """Zero tensors for every key our map expects, shaped as the source stores them."""
  shapes = jax.tree.map(lambda a: a.shape, abstract_params(cfg))
  out = []
  for key, rule in qformer_key_map(cfg, *keys).items():
    (path, _, transform), = rule.targets
    shape = tree.get(shapes, path)
    out.append(("model.pth", key, np.zeros(shape[::-1] if transform is tree.transpose else shape, np.float32)))
  return out


def test_missing_and_unexpected_keys_are_named():
  cfg = QFormerConfig.tiny()
  tensors = fake_tensors(cfg, AUDIO_KEYS)
  convert_qformer(cfg, tensors, *AUDIO_KEYS)  # complete: fine
  dropped = "audio_Qformer.bert.encoder.layer.2.crossattention.self.key.weight"
  extra = "audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"  # layer 1 has none
  broken = [t for t in tensors if t[1] != dropped] + [("model.pth", extra, np.zeros((32, 24)))]
  with pytest.raises(CheckpointError) as info:
    convert_qformer(cfg, broken, *AUDIO_KEYS, source="ckpt.pth")
  message = str(info.value)
  assert f"missing keys: {dropped}" in message
  assert f"unexpected keys: {extra} (in model.pth)" in message
  # the wrong prefix: every key unexpected, every expected key missing
  with pytest.raises(CheckpointError, match="unexpected keys: audio_query_tokens"):
    convert_qformer(cfg, tensors, *VIDEO_KEYS)


def test_mis_shaped_key_is_named():
  cfg = QFormerConfig.tiny()
  tensors = [(f, k, np.zeros((32, 25), np.float32) if k.endswith("layer.0.crossattention.self.value.weight")
              else t) for f, k, t in fake_tensors(cfg, IMAGE_KEYS)]
  pattern = r"layer\.0\.crossattention\.self\.value\.weight .* shape \(32, 25\)"
  with pytest.raises(CheckpointError, match=pattern):
    convert_qformer(cfg, tensors, *IMAGE_KEYS)


def test_position_ids_of_each_qformer_are_ignored_on_purpose():
  for prefix, _ in (IMAGE_KEYS, VIDEO_KEYS, AUDIO_KEYS):
    assert any(p.fullmatch(prefix + "bert.embeddings.position_ids") for p in IGNORED_KEYS)
  assert not any(p.fullmatch("bert.embeddings.position_ids") for p in IGNORED_KEYS)


def test_image_config_has_cross_attention_in_even_layers_only():
  cfg = QFormerConfig.image()
  layers = abstract_params(cfg)["layers"]
  assert sorted(layers) == list(range(12))
  assert [i for i in layers if "crossattention" in layers[i]] == [0, 2, 4, 6, 8, 10]
  assert layers[0]["crossattention"]["key"]["kernel"].shape == (1408, 768)
  assert layers[0]["crossattention"]["query"]["kernel"].shape == (768, 768)
  cross_keys = {int(re.search(r"layer\.(\d+)\.", k).group(1)) for k in qformer_key_map(cfg)
                if ".crossattention." in k}
  assert cross_keys == {0, 2, 4, 6, 8, 10}
  for make in (QFormerConfig.video, QFormerConfig.audio):
    assert all("crossattention" in layer for layer in abstract_params(make())["layers"].values())


@pytest.mark.parametrize("preset", ["image", "video", "audio"])
def test_parameter_counts(preset):
  cfg = PRESETS[preset][0]()
  params = abstract_params(cfg)
  assert params["query_tokens"].shape == (1, cfg.num_query_tokens, 768)
  assert count(params) - cfg.num_query_tokens * 768 == STRIPPED_PARAMS[preset]


def test_dropout_only_in_training_mode(rng):
  cfg = QFormerConfig.tiny(dropout=0.3)
  model = QFormer(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((2, 5, cfg.encoder_width)), jnp.float32)
  eval_out = model(x)
  np.testing.assert_array_equal(np.asarray(model(x, deterministic=True, rngs=nnx.Rngs(dropout=1))),
                                np.asarray(eval_out))
  train = lambda seed: np.asarray(model(x, deterministic=False, rngs=nnx.Rngs(dropout=seed)))
  a, b, a_again = train(1), train(2), train(1)
  assert np.abs(a - b).max() > 1e-2 and np.abs(a - np.asarray(eval_out)).max() > 1e-2
  np.testing.assert_array_equal(a, a_again)
  # no dropout at rate 0, even in training mode
  plain = QFormer(cfg.replace(dropout=0.0), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(plain(x, deterministic=False, rngs=nnx.Rngs(dropout=1))),
                             np.asarray(eval_out), atol=1e-6)


def test_bert_initialisation():
  cfg = QFormerConfig.video()
  params = nnx.to_pure_dict(nnx.state(QFormer(cfg, rngs=nnx.Rngs(3)), nnx.Param))
  layer = params["layers"][1]
  for kernel in (layer["attention"]["query"]["kernel"], layer["crossattention"]["key"]["kernel"],
                 layer["intermediate"]["kernel"], params["query_tokens"]):
    kernel = np.asarray(kernel)
    assert abs(kernel.std() - 0.02) < 1e-3 and abs(kernel.mean()) < 1e-3
  assert not np.asarray(layer["output"]["bias"]).any()
  np.testing.assert_array_equal(np.asarray(layer["output_norm"]["scale"]), 1.0)
  np.testing.assert_array_equal(np.asarray(params["embed_norm"]["bias"]), 0.0)
  other = nnx.to_pure_dict(nnx.state(QFormer(cfg, rngs=nnx.Rngs(4)), nnx.Param))
  assert not np.array_equal(np.asarray(other["query_tokens"]), np.asarray(params["query_tokens"]))


def test_bfloat16_params_and_output():
  cfg = QFormerConfig.tiny(dtype="bfloat16")
  model = QFormer(cfg, rngs=nnx.Rngs(0))
  assert {a.dtype for a in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}
  out = model(jnp.ones((2, 3, cfg.encoder_width), jnp.float32))
  assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
  reference = qformer_from_params(cfg.replace(dtype="float32"),
                                  jax.tree.map(lambda a: np.asarray(a, np.float32),
                                               nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  expected = reference(jnp.ones((2, 3, cfg.encoder_width), jnp.float32))
  assert float(jnp.abs(out.astype(jnp.float32) - expected).max()) < 0.1


def test_config_validation():
  from vllama_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="not divisible"):
    QFormerConfig.tiny(num_heads=5)
  with pytest.raises(ConfigError, match="cross_attention_freq"):
    QFormerConfig.tiny(cross_attention_freq=0)
  with pytest.raises(ConfigError, match="dtype"):
    QFormerConfig.tiny(dtype="int8")
  assert QFormerConfig.image().head_dim == 64


def test_sharded_forward_matches_one_device(rng):
  from jax.sharding import PartitionSpec as P
  from vllama_jax import sharding
  cfg = QFormerConfig.tiny()
  model = QFormer(cfg, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((4, 6, cfg.encoder_width)), jnp.float32)
  mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [3], [5], [1]]))
  expected = np.asarray(model(x, mask))
  mesh = sharding.make_mesh((2, 2, 2))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  kernel = state["layers"][0]["crossattention"]["query"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  with jax.set_mesh(mesh):
    got = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))(state, x, mask)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
