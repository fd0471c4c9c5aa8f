import json

import ml_collections
import pytest

from vllama_jax.cli import apply_override, load_config_file, parse_config_args
from vllama_jax.config import LLAMA_PRESETS, LlamaConfig, llama_preset
from vllama_jax.errors import ConfigError

DEMO = "configs/demo.py"


def test_presets_match_the_released_models():
  assert llama_preset("vicuna-v0-7b").vocab_size == 32001
  assert llama_preset("vicuna-v0-13b").hidden_size == 5120
  assert llama_preset("llama-2-7b-chat").vocab_size == 32000
  seven = llama_preset("llama-7b")
  assert (seven.num_heads, seven.head_dim, seven.intermediate_size, seven.num_layers) == (32, 128, 11008, 32)
  thirteen = llama_preset("llama-2-13b-chat")
  assert (thirteen.num_heads, thirteen.num_layers, thirteen.intermediate_size) == (40, 40, 13824)
  with pytest.raises(ConfigError, match="unknown LLaMA preset 'llama-3'"):
    llama_preset("llama-3")


def test_from_hf_reads_every_architecture_field_from_the_file(tmp_path):
  hf = {"vocab_size": 32001, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
        "num_attention_heads": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  cfg = LlamaConfig.from_hf(tmp_path, dtype="float32")
  assert cfg.rms_norm_eps == 1e-5 and cfg.vocab_size == 32001 and cfg.num_kv_heads == 4
  assert cfg.pad_token_id == 32000 and cfg.max_position_embeddings == 4096 and cfg.head_dim == 64
  assert LlamaConfig.from_hf(cfg.to_hf(), dtype="float32") == cfg


def test_from_hf_errors_name_the_file_and_key(tmp_path):
  with pytest.raises(ConfigError, match="no such file"):
    LlamaConfig.from_hf(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="not valid JSON"):
    LlamaConfig.from_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "hidden_size": 8}))
  with pytest.raises(ConfigError, match=r"config.json: missing key 'num_attention_heads'"):
    LlamaConfig.from_hf(tmp_path)


@pytest.mark.parametrize("key, value", [
    ("hidden_act", "gelu"), ("tie_word_embeddings", True), ("attention_bias", True),
    ("mlp_bias", True), ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
    ("head_dim", 32)])
def test_from_hf_refuses_architecture_variants_it_would_run_wrongly(key, value):
  hf = LLAMA_PRESETS["tiny"].replace(dtype="float32").to_hf()
  assert LlamaConfig.from_hf(hf, dtype="float32") == LLAMA_PRESETS["tiny"].replace(dtype="float32")
  with pytest.raises(ConfigError, match=f"config dict: {key}=.* is not supported"):
    LlamaConfig.from_hf({**hf, key: value}, dtype="float32")


def test_from_hf_reads_rope_theta_from_transformers_v5_rope_parameters():
  hf = LLAMA_PRESETS["tiny"].to_hf()
  del hf["rope_theta"]
  hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
  assert LlamaConfig.from_hf(hf).rope_theta == 5e5


def test_config_validation():
  with pytest.raises(ConfigError, match="not divisible by num_heads"):
    LLAMA_PRESETS["tiny"].replace(num_heads=5)
  with pytest.raises(ConfigError, match="dtype 'float8'"):
    LLAMA_PRESETS["tiny"].replace(dtype="float8")


def test_config_file_variants_and_overrides():
  config, rest = parse_config_args(
      ["--config", f"{DEMO}:small", "--config.sampling.top_k=5", "--config.sampling.greedy", "true",
       "--config.llama.rms_norm_eps=1e-5", "--config.workdir=/tmp/x", "--other"], DEMO)
  assert config.llama.hidden_size == 512
  assert config.sampling.top_k == 5 and config.sampling.greedy is True
  assert config.llama.rms_norm_eps == 1e-5 and config.workdir == "/tmp/x"
  assert rest == ["--other"]
  default, _ = parse_config_args([], DEMO)
  assert default.llama.hidden_size == 64


def test_unknown_or_mistyped_override_is_an_error():
  with pytest.raises(ConfigError, match=r"unknown config key 'sampling.topk'.*known keys: \[.*'top_k'"):
    parse_config_args(["--config.sampling.topk=3"], DEMO)
  with pytest.raises(ConfigError, match="unknown config key 'nope.x'"):
    parse_config_args(["--config.nope.x=3"], DEMO)
  with pytest.raises(ConfigError, match="'sampling.top_k' expects a int, got 'many'"):
    parse_config_args(["--config.sampling.top_k=many"], DEMO)
  with pytest.raises(ConfigError, match="expects true/false"):
    parse_config_args(["--config.sampling.greedy=maybe"], DEMO)
  with pytest.raises(ConfigError, match="does not exist"):
    load_config_file("configs/missing.py")
  with pytest.raises(ConfigError, match=r"demo.py': unknown variant 'huge'; expected one of \['small', 'tiny'\]"):
    load_config_file(f"{DEMO}:huge")
  config = load_config_file(DEMO)
  with pytest.raises(AttributeError):  # locked: no new keys by assignment either
    config.new_key = 1
  apply_override(config, "questions", "('a', 'b')")
  assert config.questions == ("a", "b")
  stage = load_config_file("configs/vl_stage1.py")
  assert stage.optimizer.clip_norm is None  # an unset key takes a Python literal
  apply_override(stage, "optimizer.clip_norm", "1.0")
  assert stage.optimizer.clip_norm == 1.0
  # a string key also takes a list of strings (a stage name or regexes: `trainable`)
  apply_override(stage, "trainable", "[video]")  # not a list of strings: the text itself
  assert stage.trainable == "[video]"
  apply_override(stage, "trainable", r"['video_branch\.llama_proj\..*']")
  assert stage.trainable == [r"video_branch\.llama_proj\..*"]
  assert isinstance(config, ml_collections.ConfigDict)


def test_a_bad_variant_is_an_error_line_not_a_traceback(tmp_path, capsys):
  import train
  plain = tmp_path / "plain.py"
  plain.write_text("import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({'a': 1})\n")
  with pytest.raises(ConfigError, match=r"plain.py' has no variants; got 'big'"):
    load_config_file(f"{plain}:big")
  workdir = tmp_path / "run"
  assert train.main(["--config", "configs/synthetic.py:no_frame_position", "--workdir", str(workdir)]) == 2
  assert not workdir.exists()  # nothing was started
  err = capsys.readouterr().err
  assert err.startswith("error: config file 'configs/synthetic.py': unknown variant 'no_frame_position'")
  assert "'no_frame_positions'" in err


def test_overrides_index_into_lists_of_datasets():
  config, _ = parse_config_args(["--config", "configs/vl_stage1.py:vicuna-7b", "--config.data.datasets.1.ann=cc/x.json",
                                 "--config.data.datasets.0.ratio=3"], DEMO)
  assert config.data.datasets[1]["ann"] == "cc/x.json" and config.data.datasets[0]["ratio"] == 3
  with pytest.raises(ConfigError, match=r"unknown config key 'data.datasets.7.ann'.*known keys: \[0, 1\]"):
    parse_config_args(["--config", "configs/vl_stage1.py", "--config.data.datasets.7.ann=x"], DEMO)
  with pytest.raises(ConfigError, match=r"'data.datasets.0.nope'"):
    parse_config_args(["--config", "configs/vl_stage1.py", "--config.data.datasets.0.nope=x"], DEMO)
