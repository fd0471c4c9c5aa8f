"""KV-cache generation vs transformers' generate(), and the sampling rules vs HF's logits processors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from conftest import hf_llama
from convert_weights import main as convert_main
from vllama_jax.errors import ConfigError
from vllama_jax.infer.generate import Generator, left_align
from vllama_jax.infer.sampling import SamplingConfig, apply_repetition_penalty, filter_top_k_top_p
from vllama_jax.pretrained import load_llama

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  reference, hf_dir = hf_llama(tmp_path_factory, "gen", seed=3)
  out = tmp_path_factory.mktemp("gen_out") / "converted"
  assert convert_main(["--llama", hf_dir, "--out", str(out), "--dtype", "float32"]) == 0
  return reference, load_llama(str(out)), load_llama(str(out), scan_layers=False)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(1)
  return [rng.normal(size=(n, 64)).astype(np.float32) for n in (5, 12, 3, 8)]


def hf_greedy(reference, embeds, mask, **kwargs):
  with torch.no_grad():
    out = reference.generate(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs)
  return out.numpy()


def left_padded(prompts):
  width = max(len(p) for p in prompts)
  embeds = np.zeros((len(prompts), width, prompts[0].shape[1]), np.float32)
  mask = np.zeros((len(prompts), width), np.int64)
  for i, p in enumerate(prompts):
    embeds[i, width - len(p):], mask[i, width - len(p):] = p, 1
  return embeds, mask


@pytest.mark.parametrize("layout", ["scanned", "layer-list"])
def test_greedy_is_token_identical_to_transformers_alone_and_batched(models, prompts, layout):
  reference, model = models[0], models[1 if layout == "scanned" else 2]
  config = SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, eos_token_id=None)
  generator = Generator(model, length_multiple=16)
  with jax.default_matmul_precision("highest"):
    batched = generator([jnp.asarray(p) for p in prompts], config)
    alone = [generator([jnp.asarray(p)], config) for p in prompts]
  hf_batched = hf_greedy(reference, *left_padded(prompts), eos_token_id=None)
  for i, p in enumerate(prompts):
    hf_alone = hf_greedy(reference, p[None], np.ones((1, len(p)), np.int64), eos_token_id=None)[0]
    np.testing.assert_array_equal(alone[i].tokens[0], hf_alone)
    np.testing.assert_array_equal(batched.tokens[i], hf_alone)
    np.testing.assert_array_equal(batched.tokens[i], hf_batched[i])
  assert list(batched.lengths) == [NEW_TOKENS] * len(prompts)


def test_eos_and_multi_token_stop_sequences(models, prompts):
  model = models[1]
  generator = Generator(model, length_multiple=16)
  free = generator([jnp.asarray(p) for p in prompts], SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True,
                                                                      eos_token_id=None))
  row = free.tokens[1]
  # EOS: pretend the 4th generated token is EOS -> row ends after it, the rest is pad.
  eos = int(row[3])
  first = int(np.argmax(row == eos)) + 1
  out = generator([jnp.asarray(prompts[1])], SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True,
                                                            eos_token_id=eos, pad_token_id=-7))
  assert out.lengths[0] == first
  np.testing.assert_array_equal(out.tokens[0, :first], row[:first])
  assert (out.tokens[0, first:] == -7).all()
  # A two-token stop sequence taken from positions 5-6 stops right after it, in that row only.
  stop = (int(row[5]), int(row[6]))
  ends = [i + 2 for i in range(NEW_TOKENS - 1) if (row[i], row[i + 1]) == stop]
  out = generator([jnp.asarray(p) for p in prompts],
                  SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, eos_token_id=None,
                                 stop_sequences=((999_999,), stop)))
  assert out.lengths[1] == ends[0]
  for i in range(len(prompts)):
    toks = free.tokens[i]
    expected = next((j + 2 for j in range(NEW_TOKENS - 1) if (toks[j], toks[j + 1]) == stop), NEW_TOKENS)
    assert out.lengths[i] == expected
    np.testing.assert_array_equal(out.tokens[i, :expected], toks[:expected])


def test_streamed_tokens_arrive_in_order_and_equal_the_result(models, prompts):
  generator = Generator(models[2], length_multiple=16)
  row = generator([jnp.asarray(prompts[1])], SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True,
                                                            eos_token_id=None)).tokens[0]
  stop = (int(row[4]),)  # rows stop at different steps
  config = SamplingConfig(max_new_tokens=NEW_TOKENS, seed=5, eos_token_id=None, stop_sequences=(stop,))
  seen = []
  out = generator([jnp.asarray(p) for p in prompts], config,
                  on_step=lambda step, tokens, active: seen.append((step, tokens.copy(), active.copy())))
  assert [s for s, _, _ in seen] == list(range(len(seen)))
  streamed = [[int(t[i]) for _, t, a in seen if a[i]] for i in range(len(prompts))]
  assert streamed == out.rows()
  np.testing.assert_array_equal(generator([jnp.asarray(p) for p in prompts], config).tokens, out.tokens)


def test_sampling_is_reproducible_per_row_and_seed_dependent(models, prompts):
  model = models[1]
  generator = Generator(model, length_multiple=16)
  config = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.5, top_p=0.95, top_k=50,
                          repetition_penalty=1.2, eos_token_id=None)
  batched = generator([jnp.asarray(p) for p in prompts], config, seeds=[11, 12, 13, 14])
  for i, p in enumerate(prompts):
    alone = generator([jnp.asarray(p)], config, seeds=[11 + i])
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[i])
  other = generator([jnp.asarray(p) for p in prompts], config, seeds=[21, 22, 23, 24])
  assert (other.tokens != batched.tokens).any()


def test_same_buckets_never_recompile(models, prompts):
  model = models[1]
  generator = Generator(model, length_multiple=16)
  config = SamplingConfig(max_new_tokens=NEW_TOKENS + 1, greedy=False, eos_token_id=None)
  generator([jnp.asarray(prompts[0])], config)
  before = Generator.compiled_programs()
  generator([jnp.asarray(prompts[2])], config)  # other length, same bucket of 16
  generator([jnp.asarray(prompts[3])], SamplingConfig(max_new_tokens=NEW_TOKENS + 1, temperature=0.7,
                                                      top_p=0.5, top_k=3, eos_token_id=None, seed=9))
  assert Generator.compiled_programs() == before
  generator([jnp.asarray(p) for p in prompts[:3]], config)  # batch 3 -> bucket 4: one new program
  generator([jnp.asarray(p) for p in prompts], config)  # batch 4, same bucket
  assert Generator.compiled_programs() == before + 1


def test_sampling_filters_match_transformers_logits_warpers():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
  logits[0, :5] = 4.0  # ties
  seen = rng.random((6, 50)) < 0.2
  for top_k, top_p in [(0, 0.9), (5, 1.0), (10, 0.5), (1, 0.3), (0, 1.0), (50, 0.05)]:
    expected = torch.tensor(logits)
    if top_k:
      expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
      expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_top_k_top_p(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), np.isfinite(expected.numpy()),
                                  err_msg=f"top_k={top_k} top_p={top_p}")
  ids = torch.tensor([np.flatnonzero(row)[:5].tolist() + [0] * (5 - min(5, row.sum())) for row in seen])
  seen_from_ids = np.zeros_like(seen)
  for r, row in enumerate(ids.numpy()):
    seen_from_ids[r, row] = True
  expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, torch.tensor(logits)).numpy()
  got = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen_from_ids), jnp.float32(1.3))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
  expected = TemperatureLogitsWarper(0.7)(None, torch.tensor(logits)).numpy()
  np.testing.assert_allclose(np.asarray(jnp.asarray(logits) / 0.7), expected, rtol=1e-6)


def test_sampled_tokens_follow_the_filtered_distribution():
  from vllama_jax.infer.sampling import choose_tokens
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
  keys = jax.vmap(jax.random.key)(jnp.arange(4000))
  knobs = SamplingConfig(top_p=0.8, top_k=0).knobs()
  tokens = np.asarray(choose_tokens(logits, jnp.zeros(logits.shape, bool), keys, knobs, greedy=False))
  freq = np.bincount(tokens, minlength=4) / len(tokens)
  assert freq[2] == freq[3] == 0  # outside the top-0.8 mass
  np.testing.assert_allclose(freq[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_left_align_moves_any_padding_to_the_left():
  embeds = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1) + 1
  mask = jnp.asarray([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
  aligned, new_mask = left_align(embeds, mask)
  np.testing.assert_array_equal(np.asarray(new_mask), [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(aligned[..., 0]), [[0, 0, 1, 2, 3], [0, 7, 8, 9, 10]])


def test_bad_requests_are_clear_errors(models):
  model = models[1]
  with pytest.raises(ConfigError, match="top_p"):
    SamplingConfig(top_p=0)
  with pytest.raises(ConfigError, match="temperature"):
    SamplingConfig(temperature=0)
  with pytest.raises(ConfigError, match="stop sequences must not be empty"):
    SamplingConfig(stop_sequences=((),))
  with pytest.raises(ConfigError, match=r"top_k must be >= 0 \(0: off\), got -5"):
    SamplingConfig(top_k=-5)
  with pytest.raises(ConfigError, match=r"repetition_penalty must be > 0 \(1: off\), got 0"):
    SamplingConfig(repetition_penalty=0)
  generator = Generator(model)
  with pytest.raises(ValueError, match=r"prompt 0 has shape \(3, 10\); expected \(length > 0, 64\)"):
    generator([jnp.zeros((3, 10))])
  with pytest.raises(ValueError, match="2 seeds given for 1 prompts"):
    generator([jnp.zeros((3, 64))], seeds=[1, 2])
