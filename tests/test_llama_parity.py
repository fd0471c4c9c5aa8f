"""Logits of our LLaMA vs transformers' LlamaForCausalLM, same weights through our converter, fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import hf_llama
from convert_weights import main as convert_main
from vllama_jax.pretrained import load_llama

TOLERANCE = 1e-4


def right_padded_batch(rng, vocab, lengths):
  width = max(lengths)
  ids = rng.integers(3, vocab, size=(len(lengths), width))
  mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  ids[:, 0] = 1  # BOS
  return ids * mask, mask


def convert_and_load(hf_dir, out_dir, **runtime):
  assert convert_main(["--llama", hf_dir, "--out", str(out_dir), "--dtype", "float32"]) == 0
  return load_llama(str(out_dir), **runtime)


def compare(model, reference, ids, mask):
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  valid = mask.astype(bool)
  assert got.dtype == np.float32
  return np.abs(got[valid] - expected[valid]).max()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_tiny_logits_match_transformers(tmp_path_factory, tmp_path, rng, kv_heads):
  reference, hf_dir = hf_llama(tmp_path_factory, "tiny", num_key_value_heads=kv_heads)
  model = convert_and_load(hf_dir, tmp_path / "out")
  ids, mask = right_padded_batch(rng, 384, [11, 7, 3])
  assert compare(model, reference, ids, mask) <= TOLERANCE


def test_real_7b_width_two_layers_logits_match_transformers(tmp_path_factory, tmp_path, rng):
  reference, hf_dir = hf_llama(tmp_path_factory, "width7b", hidden_size=4096, intermediate_size=11008,
                               num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=2,
                               vocab_size=384)
  model = convert_and_load(hf_dir, tmp_path / "out")
  ids, mask = right_padded_batch(rng, 384, [9, 5])
  assert compare(model, reference, ids, mask) <= TOLERANCE


def test_embeds_input_remat_and_layer_list_give_the_same_model(tmp_path_factory, tmp_path, rng):
  _, hf_dir = hf_llama(tmp_path_factory, "embeds")
  model = convert_and_load(hf_dir, tmp_path / "out")
  ids, mask = right_padded_batch(rng, 384, [6, 4])
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  from_ids = model(ids, attention_mask=mask)
  from_embeds = model(inputs_embeds=model.embed(ids), attention_mask=mask)
  np.testing.assert_array_equal(np.asarray(from_ids), np.asarray(from_embeds))

  def loss(m):
    return jnp.mean(m(ids, attention_mask=mask) ** 2)

  from flax import nnx
  reference_grads = nnx.to_pure_dict(nnx.grad(loss)(model))
  for runtime in [dict(remat=True), dict(scan_layers=False), dict(scan_layers=False, remat=True)]:
    other = load_llama(str(tmp_path / "out"), **runtime)
    with jax.default_matmul_precision("highest"):
      np.testing.assert_allclose(np.asarray(other(ids, attention_mask=mask)),
                                 np.asarray(model(ids, attention_mask=mask)), atol=1e-5)
    grads = nnx.to_pure_dict(nnx.grad(loss)(other))
    if not other.config.scan_layers:  # compare layer i of the list with row i of the stack
      stacked = grads.pop("layers")
      grads["layers"] = jax.tree.map(lambda *rows: jnp.stack(rows), *[stacked[i] for i in sorted(stacked)])
    for a, b in zip(jax.tree.leaves(reference_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_left_padding_gives_each_row_its_unpadded_logits(tmp_path_factory, tmp_path, rng):
  reference, hf_dir = hf_llama(tmp_path_factory, "leftpad")
  model = convert_and_load(hf_dir, tmp_path / "out")
  ids = rng.integers(3, 384, size=(1, 6))
  padded = jnp.asarray(np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1))
  mask = jnp.asarray(np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]]))
  with jax.default_matmul_precision("highest"):
    alone = np.asarray(model(jnp.asarray(ids)))
    left = np.asarray(model(padded, attention_mask=mask))[:, 3:]
  assert np.abs(alone - left).max() <= 1e-5
