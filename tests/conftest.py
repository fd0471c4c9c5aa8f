import os
import tempfile

# Eight fake CPU devices for the sharding tests; must be set before JAX starts. And no LLVM optimisation
# of the compiled kernels: most tests are a compile and a run of tiny shapes, and at -O0 the compile
# takes half as long (the smoke config's train step 15 -> 7.5 s; the suite 1,620 -> 1,300 CPU-s). Only
# the order of some float sums changes (unvectorised reductions): the smoke run's losses move by an ulp.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# One persistent compilation cache for the run: set here in the xdist controller, before its workers
# start, so that both workers and the training runs they start in subprocesses share it. Many tests
# compile the same program (the smoke config's train step in every `loop.train` call); the first
# compiles it, the others load it (tests/test_train_loop.py 155 -> 88 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.TemporaryDirectory(prefix="vllama_jax_tests_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache.name

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


# pyproject's `--dist loadfile --no-loadscope-reorder` hands each xdist worker whole files (no module
# fixture runs twice) in this order: the synthetic training pair (a quarter hour on one core) first; then
# two files of quick tests (a worker starts with two files: the other worker takes the first, the one with
# the pair gets the second queued behind it); then the longest files, so that none of them is left for
# the end while the other worker idles.
FIRST = ("test_synthetic_learns.py", "test_config.py", "test_conversation.py", "test_multihost.py",
         "test_train_loop.py", "test_chat.py", "test_llama_parity.py", "test_notebook.py", "test_imagebind.py",
         "test_video_branch.py", "test_convert_video_branch.py")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    name = os.path.basename(item.path)
    return FIRST.index(name) if name in FIRST else len(FIRST)
  items.sort(key=rank)
