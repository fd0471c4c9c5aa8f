"""The stage configs carry the reference's hyperparameters (spec 3.1-3.2) and train what it trains."""

import os

import jax
import pytest
from flax import nnx

from vllama_jax.cli import load_config_file
from vllama_jax.data.build import data_config
from vllama_jax.config import llama_preset
from vllama_jax.errors import ConfigError
from vllama_jax.models.audio_branch import AudioBranchConfig
from vllama_jax.models.video_branch import VideoBranchConfig
from vllama_jax.models.video_llama import VideoLLaMA, VideoLlamaConfig
from vllama_jax.sharding import abstract_model
from vllama_jax.train.optimizer import OptimizerConfig
from vllama_jax.train.trainable import count_params, split_state

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# stage: (init_lr, min_lr, warmup_lr, warmup_steps, iters_per_epoch, max_epoch, batch, mode)
REFERENCE = {
    "vl_stage1": (1e-4, 8e-5, 1e-6, 2500, 2500, 5, 32, "video"),
    "vl_stage2": (3e-5, 1e-5, 1e-6, 1000, 1000, 3, 4, "video"),
    "al_stage1": (1e-4, 8e-5, 1e-6, 5000, 5000, 5, 32, "audio_vision"),
    "al_stage2": (3e-5, 1e-5, 1e-6, 400, 1000, 3, 4, "audio_vision"),
}
# Trainable parameters of the released branches (spec 3.1): (7B, 13B).
TRAINABLE = {"vl": (22_104_064, 22_891_520), "al": (22_855_680, 23_643_136)}


@pytest.mark.parametrize("stage", sorted(REFERENCE))
@pytest.mark.parametrize("variant", ["vicuna-7b", "llama2-13b"])
def test_stage_configs_carry_the_reference_hyperparameters(stage, variant):
  c = load_config_file(os.path.join(CONFIGS, f"{stage}.py:{variant}"))
  o = c.optimizer
  assert (o.init_lr, o.min_lr, o.warmup_lr, o.warmup_steps, o.iters_per_epoch, o.max_epoch,
          c.data.batch_size, c.mode) == REFERENCE[stage]
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.999, 1e-8, 0.05, None)
  assert c.template == ("vicuna" if variant.startswith("vicuna") else "llama_2")
  assert c.data.num_frames == 8 and c.seed == 42
  OptimizerConfig(**o.to_dict())  # every key is one the optimizer knows
  if stage.endswith("stage2"):
    assert c.data.end_sym == ("###" if c.template == "vicuna" else "</s>")
    assert c.data.max_txt_len == (320 if stage == "vl_stage2" else 512) and c.data.max_len == 512
    first = ("###Human: <Image><ImageHere></Image> Describe this image in detail. ###Assistant: "
             if c.template == "vicuna" else None)
    assert len(c.data.prompts) == 4 and all(p.count("<ImageHere>") == 1 for p in c.data.prompts)
    assert first is None or c.data.prompts[0] == first  # alignment_image.txt in the Vicuna template
    assert {d["format"] for d in c.data.datasets} == {"image_caption", "llava", "videochat"}
    assert {d.get("ratio", 1.0) for d in c.data.datasets} == {1.0}  # uniform
  else:
    assert c.data.end_sym == "\n" and c.data.max_txt_len == 32
    assert [(d["format"], d["ratio"]) for d in c.data.datasets] == [("webvid", 100.0), ("image_caption", 24.0)]
  assert c.data.num_query_tokens == (8 if stage.startswith("al") else 32)


def test_stage_batch_is_per_device_as_the_reference_per_gpu_batch():
  stage = load_config_file(os.path.join(CONFIGS, "vl_stage1.py"))
  assert jax.local_device_count() == 8  # tests/conftest.py
  assert data_config(stage, train=True).batch_size == 32 * 8
  assert data_config(stage, train=False).batch_size == 32 * 8
  synthetic = load_config_file(os.path.join(CONFIGS, "synthetic.py"))  # per process
  assert data_config(synthetic, train=True).batch_size == synthetic.data.batch_size


@pytest.mark.parametrize("size,hidden", [(0, 4096), (1, 5120)])
def test_stage_trainable_sets_count_as_the_release(size, hidden):
  cfg = VideoLlamaConfig(llama=llama_preset("vicuna-v0-7b" if size == 0 else "vicuna-v0-13b"),
                         video=VideoBranchConfig.release(hidden), audio=AudioBranchConfig.release(hidden))
  _, state = abstract_model(lambda: VideoLLaMA(cfg, rngs=nnx.Rngs(0)))
  for stage, branch in (("vl_stage1", "vl"), ("al_stage2", "al")):
    trainable = load_config_file(os.path.join(CONFIGS, f"{stage}.py")).trainable
    assert count_params(split_state(state, trainable)[0]) == TRAINABLE[branch][size]
  joint = load_config_file(os.path.join(CONFIGS, "joint.py")).trainable
  assert count_params(split_state(state, joint)[0]) == TRAINABLE["vl"][size] + TRAINABLE["al"][size]


def test_unknown_variant_and_override_keys_are_errors():
  with pytest.raises(ConfigError, match=r"vl_stage1.py': unknown LLM variant 'gpt-7b'; expected one of \[.*'vicuna-7b'"):
    load_config_file(os.path.join(CONFIGS, "vl_stage1.py:gpt-7b"))
  from vllama_jax.cli import apply_override
  c = load_config_file(os.path.join(CONFIGS, "vl_stage1.py"))
  with pytest.raises(ConfigError, match="optimizer has no 'init_learning_rate'"):
    apply_override(c, "optimizer.init_learning_rate", "1e-3")



@pytest.mark.parametrize("key,value,message", [
    ("mode", "vision", "unknown training mode 'vision'"), ("trainable", "vl2", "unknown trainable stage"),
    ("log_every", -1, r"log_every must be an integer >= 0 \(0: off\), got -1"),
    ("checkpoint.keep", 0, "checkpoint.keep must be an integer >= 1"),
    ("accum_steps", 0, "accum_steps must be an integer >= 1"), ("optimizer.lr", 1.0, "optimizer: .*'lr'"),
    ("init_dir", "gs://bucket/video-llama", "init_dir 'gs://bucket/video-llama': URLs are not supported"),
    ("steps", -5, r"steps must be an integer >= 0 \(0: optimizer.max_epoch x iters_per_epoch\), got -5"),
    ("optimizer.warmup_steps", -1, "optimizer: warmup_steps must be >= 0, got -1")])
def test_train_rejects_a_bad_config_before_loading_the_model(key, value, message, tmp_path):
  from vllama_jax.train import loop
  c = load_config_file(os.path.join(CONFIGS, "vl_stage1.py"))
  *parent, leaf = key.split(".")
  node = c[parent[0]] if parent else c
  with node.unlocked():
    node[leaf] = value
  with pytest.raises(ConfigError, match=message):  # loading would fail next: init_dir is ""
    loop.train(c, str(tmp_path))


def test_train_refuses_a_url_workdir_that_would_become_a_local_folder():
  from vllama_jax.train import loop
  c = load_config_file(os.path.join(CONFIGS, "vl_stage1.py"))
  with pytest.raises(ConfigError, match="workdir 'gs://bucket/runs/vl1': URLs are not supported"):
    loop.train(c, "gs://bucket/runs/vl1")
  assert not os.path.exists("gs:")


def test_train_refuses_a_model_whose_queries_the_prompts_do_not_fit(tmp_path):
  """Prompts with room for 32 video rows and a video Q-Former writing 6 would splice rows that do not
  exist into every prompt (NaN losses): refused before the model's weights are read."""
  from vllama_jax.cli import apply_override
  from vllama_jax.random_checkpoint import write_random_video_llama
  from vllama_jax.train import loop
  init = write_random_video_llama(str(tmp_path / "init"))  # VideoLlamaConfig.tiny: 6 video queries
  (tmp_path / "webvid").mkdir()
  (tmp_path / "webvid" / "part0.csv").write_text("videoid,page_dir,name\n1,p0,a dog runs\n")
  c = load_config_file(os.path.join(CONFIGS, "vl_stage1.py"))
  for key, value in {"init_dir": init, "data.datasets.0.ann": str(tmp_path / "webvid"),
                     "data.datasets.0.media": str(tmp_path / "videos"), "data.datasets.1.ratio": "0",
                     "steps": "1"}.items():  # without the check: one NaN step, and no error
    apply_override(c, key, value)
  with pytest.raises(ConfigError, match=r"runs of \(32,\) media rows \(data.num_query_tokens=32\), but the "
                                        r"Q-Formers of the model in .* write \(6,\)"):
    loop.train(c, str(tmp_path / "run"))
