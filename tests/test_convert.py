"""convert_weights.py --llama: formats, key accounting, streaming memory, and every error case."""

import json
import os
import shutil
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import hf_llama
from convert_weights import main as convert_main
from vllama_jax import random_checkpoint
from vllama_jax.config import LlamaConfig
from vllama_jax.convert.llama import convert_llama_checkpoint
from vllama_jax.errors import CheckpointError
from vllama_jax.pretrained import load_llama

CFG = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                  num_kv_heads=2, rms_norm_eps=1e-5, dtype="float32")


def hf_dir(tmp_path, num_shards=1, name="hf"):
  directory = str(tmp_path / name)
  state = random_checkpoint.random_llama_state(CFG, seed=1)
  random_checkpoint.write_hf_llama(directory, CFG, state, num_shards=num_shards)
  random_checkpoint.write_tokenizer(directory)
  return directory, state


def assert_params_equal(model, state, dtype=np.float32):
  params = nnx.to_pure_dict(nnx.state(model))
  np.testing.assert_array_equal(np.asarray(params["embed_tokens"]), state["model.embed_tokens.weight"].astype(dtype))
  np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), state["lm_head.weight"].T.astype(dtype))
  for i in range(CFG.num_layers):
    np.testing.assert_array_equal(np.asarray(params["layers"]["self_attn"]["k_proj"]["kernel"][i]),
                                  state[f"model.layers.{i}.self_attn.k_proj.weight"].T.astype(dtype))
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][i]),
                                  state[f"model.layers.{i}.mlp.down_proj.weight"].T.astype(dtype))
    np.testing.assert_array_equal(np.asarray(params["layers"]["post_attention_layernorm"]["weight"][i]),
                                  state[f"model.layers.{i}.post_attention_layernorm.weight"].astype(dtype))


@pytest.mark.parametrize("num_shards", [1, 3])
def test_safetensors_round_trip(tmp_path, num_shards):
  src, state = hf_dir(tmp_path, num_shards)
  convert_llama_checkpoint(src, str(tmp_path / "out"), dtype="float32")
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "params", "tokenizer.model",
                                                   "tokenizer_config.json"]
  assert_params_equal(load_llama(str(tmp_path / "out")), state)


def test_default_dtype_is_bfloat16(tmp_path):
  src, state = hf_dir(tmp_path)
  assert convert_main(["--llama", src, "--out", str(tmp_path / "out")]) == 0
  model = load_llama(str(tmp_path / "out"))
  assert model.embed_tokens[...].dtype == ml_dtypes.bfloat16
  assert json.loads((tmp_path / "out" / "config.json").read_text())["llama"]["torch_dtype"] == "bfloat16"
  assert_params_equal(model, state, dtype=ml_dtypes.bfloat16)


def safetensors_to_bin_shards(directory):
  """Rewrites a sharded safetensors HF directory as pytorch_model-*.bin shards with their index."""
  index_path = os.path.join(directory, "model.safetensors.index.json")
  weight_map = json.loads(open(index_path).read())["weight_map"]
  renamed = {}
  for shard in sorted(set(weight_map.values())):
    state = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(directory, shard)).items()}
    name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
    torch.save(state, os.path.join(directory, name))
    os.remove(os.path.join(directory, shard))
    renamed[shard] = name
  os.remove(index_path)
  with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"weight_map": {k: renamed[v] for k, v in weight_map.items()}}, f)
  return [os.path.join(directory, n) for n in sorted(renamed.values())]


def test_sharded_pytorch_bin_with_index_and_ignored_rotary_buffers(tmp_path_factory, tmp_path):
  reference, directory = hf_llama(tmp_path_factory, "bin", max_shard_size="200KB")
  shards = safetensors_to_bin_shards(directory)
  assert len(shards) > 1
  # Older conversions saved rotary inv_freq buffers beside the weights: they are dropped on purpose.
  state = torch.load(shards[0], weights_only=True)
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
  torch.save(state, shards[0])
  convert_llama_checkpoint(directory, str(tmp_path / "out"), dtype="float32")
  expected = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = load_llama(str(tmp_path / "out"))
  params = nnx.to_pure_dict(nnx.state(model))
  np.testing.assert_array_equal(np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1]),
                                expected["model.layers.1.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(np.asarray(params["norm"]["weight"]), expected["model.norm.weight"])


def test_a_file_that_is_no_pickle_is_one_line_naming_it(tmp_path):
  src, _ = hf_dir(tmp_path)
  os.remove(os.path.join(src, "model.safetensors"))
  path = os.path.join(src, "pytorch_model.bin")
  with open(path, "wb") as f:
    f.write(b"garbage, not a checkpoint\n")
  message = expect_error(tmp_path, src, path, "truncated or corrupt")
  assert "\n" not in message and "weights_only" not in message  # not torch's advice to unpickle anything


def test_a_legacy_format_torch_pickle_converts(tmp_path):
  """A .bin saved in torch's pre-1.6 format, which cannot be memory-mapped, is read whole."""
  src, state = hf_dir(tmp_path)
  os.remove(os.path.join(src, "model.safetensors"))
  path = os.path.join(src, "pytorch_model.bin")
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path, _use_new_zipfile_serialization=False)
  assert open(path, "rb").read(4) != b"PK\x03\x04"
  convert_llama_checkpoint(src, str(tmp_path / "out"), dtype="float32")
  assert_params_equal(load_llama(str(tmp_path / "out")), state)
  with open(path, "r+b") as f:  # truncated, it is still an error naming the file
    f.truncate(os.path.getsize(path) // 2)
  expect_error(tmp_path, src, path, "truncated or corrupt")


def test_streaming_keeps_one_copy_of_the_output(tmp_path):
  cfg = CFG.replace(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=4)
  src = str(tmp_path / "hf")
  random_checkpoint.write_hf_llama(src, cfg, num_shards=2)
  random_checkpoint.write_tokenizer(src)
  state = random_checkpoint.random_llama_state(cfg)
  output_bytes = sum(v.nbytes for v in state.values())
  largest_leaf = cfg.num_layers * 256 * 1024 * 4  # a stacked MLP kernel
  del state
  tracemalloc.start()
  try:
    convert_llama_checkpoint(src, str(tmp_path / "out"), dtype="float32")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < output_bytes + 2 * largest_leaf, (peak, output_bytes)


def expect_error(tmp_path, src, *messages):
  out = tmp_path / "out_failed"
  with pytest.raises(CheckpointError) as info:
    convert_llama_checkpoint(src, str(out), dtype="float32")
  for message in messages:
    assert message in str(info.value), str(info.value)
  assert not out.exists()  # no half-written output
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".converting-")]
  return str(info.value)


def test_missing_paths_and_files(tmp_path):
  from vllama_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="no such file"):
    convert_llama_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  src, _ = hf_dir(tmp_path)
  os.remove(os.path.join(src, "tokenizer.model"))
  expect_error(tmp_path, src, "no tokenizer found", "tokenizer.model")
  src, _ = hf_dir(tmp_path, name="noweights")
  os.remove(os.path.join(src, "model.safetensors"))
  expect_error(tmp_path, src, "no weights found")
  src, _ = hf_dir(tmp_path, num_shards=2, name="lostshard")
  os.remove(os.path.join(src, "model-00002-of-00002.safetensors"))
  expect_error(tmp_path, src, "model.safetensors.index.json names shards that are missing",
               "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_truncated_shard_names_the_file(tmp_path, suffix):
  src, state = hf_dir(tmp_path)
  if suffix == "bin":
    os.remove(os.path.join(src, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, os.path.join(src, "pytorch_model.bin"))
  path = os.path.join(src, "model.safetensors" if suffix == "safetensors" else "pytorch_model.bin")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  expect_error(tmp_path, src, path, "truncated or corrupt")


def test_shape_unexpected_and_missing_keys_are_named(tmp_path):
  src, state = hf_dir(tmp_path)
  config = json.loads(open(os.path.join(src, "config.json")).read())
  config["intermediate_size"] = 180
  open(os.path.join(src, "config.json"), "w").write(json.dumps(config))
  expect_error(tmp_path, src, "model.layers.0.mlp.gate_proj.weight", "has shape (172, 64), expected (180, 64)")

  src, state = hf_dir(tmp_path, name="keys")
  state["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  del state["model.layers.1.mlp.up_proj.weight"]
  save_file(state, os.path.join(src, "model.safetensors"))
  message = expect_error(tmp_path, src, "unexpected keys: model.layers.0.self_attn.extra.weight",
                         "missing keys: model.layers.1.mlp.up_proj.weight")
  assert "inv_freq" not in message


def test_existing_output_is_never_overwritten(tmp_path, capsys):
  src, _ = hf_dir(tmp_path)
  out = tmp_path / "mine"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  assert convert_main(["--llama", src, "--out", str(out)]) == 2
  assert "already exists and is not empty" in capsys.readouterr().err
  assert (out / "precious.txt").read_text() == "keep me"


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
  assert convert_main(["--llama", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "missing" in err and "\n" not in err


def test_converted_directory_errors(tmp_path):
  src, _ = hf_dir(tmp_path)
  out = tmp_path / "out"
  convert_llama_checkpoint(src, str(out), dtype="float32")
  shutil.rmtree(out / "params" / "llama.norm.weight")
  with pytest.raises(CheckpointError, match=r"llama.norm.weight: missing; the converted directory has no parameter"):
    load_llama(str(out))
  with pytest.raises(CheckpointError, match="config.json: no such file"):
    load_llama(str(tmp_path))
