import os

# Eight fake CPU devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from vllama_jax.torch_compat import install_torchvision_shim

install_torchvision_shim()  # before anything imports a transformers model


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def hf_llama(tmp_path_factory, name, seed=0, save=True, safe_serialization=True, max_shard_size=None,
             **config):
  """A random transformers LlamaForCausalLM (eager attention, fp32), saved as a HF directory with a
  trained SentencePiece tokenizer beside it. Returns (model, directory)."""
  from transformers import LlamaConfig, LlamaForCausalLM
  from vllama_jax.random_checkpoint import write_tokenizer
  torch.manual_seed(seed)
  defaults = dict(vocab_size=384, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  attn_implementation="eager", tie_word_embeddings=False)
  model = LlamaForCausalLM(LlamaConfig(**(defaults | config))).eval()
  with torch.no_grad():  # HF initialises norms to exactly 1; perturb them so they are tested
    for name_, p in model.named_parameters():
      if "norm" in name_:
        p.add_(torch.randn_like(p) * 0.1)
  directory = str(tmp_path_factory.mktemp(name))
  if save:
    kwargs = {"safe_serialization": safe_serialization}
    if max_shard_size:
      kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **kwargs)
    write_tokenizer(directory, vocab_size=384)
  return model, directory


def pytest_collection_modifyitems(config, items):
  """The synthetic training run takes several minutes: start it first, so that the rest of the suite runs
  beside it on the other worker instead of after it."""
  items.sort(key=lambda item: "test_synthetic_learns" not in item.nodeid)
