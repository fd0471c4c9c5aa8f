"""The same converted LLaMA on several meshes of 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import hf_llama
from convert_weights import main as convert_main
from vllama_jax import sharding
from vllama_jax.errors import ConfigError
from vllama_jax.infer.generate import Generator
from vllama_jax.infer.sampling import SamplingConfig
from vllama_jax.pretrained import load_llama

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  _, hf_dir = hf_llama(tmp_path_factory, "shard", seed=5)
  out = tmp_path_factory.mktemp("shard_out") / "converted"
  assert convert_main(["--llama", hf_dir, "--out", str(out), "--dtype", "float32"]) == 0
  return str(out)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(2)
  lengths = np.array([12, 9, 16, 3, 16, 7, 1, 11])
  mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
  return jnp.asarray(rng.integers(3, 384, size=(8, 16)) * mask), jnp.asarray(mask)


@pytest.fixture(scope="module")
def single_device_logits(converted, batch):
  model = load_llama(converted, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  return np.asarray(model(batch[0], attention_mask=batch[1]))


def expected_spec(mesh, names, shape):
  """Spec that the rules table promises: mesh axes of size 1 dropped, uneven dims replicated."""
  axes = []
  for name, size in zip(names, shape):
    rule = sharding.LOGICAL_RULES[name]
    rule = tuple(a for a in ((rule,) if isinstance(rule, str) else (rule or ())) if mesh.shape[a] > 1)
    n = int(np.prod([mesh.shape[a] for a in rule]))
    axes.append(None if not rule or size % n else (rule[0] if len(rule) == 1 else rule))
  return P(*axes)


@pytest.mark.parametrize("shape", MESHES)
def test_forward_matches_single_device_and_params_are_sharded(converted, batch, single_device_logits, shape):
  mesh = sharding.make_mesh(shape)
  model = load_llama(converted, mesh)
  checks = {
      ("embed_tokens",): ("vocab", "embed"),
      ("lm_head", "kernel"): ("embed", "vocab"),
      ("layers", "self_attn", "q_proj", "kernel"): ("layers", "embed", "heads"),
      ("layers", "self_attn", "o_proj", "kernel"): ("layers", "heads", "embed"),
      ("layers", "mlp", "gate_proj", "kernel"): ("layers", "embed", "mlp"),
      ("layers", "mlp", "down_proj", "kernel"): ("layers", "mlp", "embed"),
      ("layers", "input_layernorm", "weight"): ("layers", "norm"),
  }
  state = nnx_pure(model)
  for path, names in checks.items():
    array = state
    for part in path:
      array = array[part]
    spec = expected_spec(mesh, names, array.shape)
    assert array.sharding.spec == spec, path
    shard_shape = array.addressable_shards[0].data.shape
    expected_shard = tuple(n // (np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s)])
                                 if s else 1) for n, s in zip(array.shape, tuple(spec) + (None,) * 9))
    assert shard_shape == expected_shard, path
  if shape == (2, 2, 2):  # the rules really split weights here
    assert state["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda m, ids, mask: m(ids, attention_mask=mask))(model, *batch)
  valid = np.asarray(batch[1]).astype(bool)
  assert np.abs(np.asarray(logits)[valid] - single_device_logits[valid]).max() <= 1e-5


def test_greedy_generation_on_a_sharded_mesh_matches_one_device(converted):
  rng = np.random.default_rng(3)
  prompts = [jnp.asarray(rng.normal(size=(n, 64)).astype(np.float32)) for n in (4, 9)]
  config = SamplingConfig(max_new_tokens=8, greedy=True, eos_token_id=None)
  one = Generator(load_llama(converted), length_multiple=16)(prompts, config)
  mesh = sharding.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh):
    sharded = Generator(load_llama(converted, mesh), length_multiple=16)(prompts, config)
  np.testing.assert_array_equal(one.tokens, sharded.tokens)


def nnx_pure(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model))


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  assert dict(sharding.make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert dict(sharding.make_mesh((1, 1, -1)).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
  assert sharding.make_mesh().axis_names == ("data", "fsdp", "tensor")
  with pytest.raises(ConfigError, match=r"needs 12 devices, but 8 are available"):
    sharding.make_mesh((3, 4, 1))
  with pytest.raises(ConfigError, match="at most one entry may be -1"):
    sharding.make_mesh((-1, -1, 1))
  with pytest.raises(ConfigError, match="does not divide 8 devices"):
    sharding.make_mesh((-1, 3, 1))
  with pytest.raises(ConfigError, match="must have 3 entries"):
    sharding.make_mesh((8, 1))


def test_rules_replicate_uneven_dims_and_use_each_mesh_axis_once():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.logical_to_spec(("vocab", "embed"), (32001, 64), mesh) == P(None, "fsdp")
  assert sharding.logical_to_spec(("batch", "length", "act_embed"), (8, 5, 64), mesh) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("batch", "embed"), (8, 64), mesh) == P(("data", "fsdp"), None)
  with pytest.raises(ConfigError, match="'nonsense' has no entry"):
    sharding.logical_to_spec(("nonsense",))
