"""convert_weights.py --eva/--blip2/--vl-ckpt: the video branch from synthetic files in the released layouts.

Source files are written here with torch at `VideoBranchConfig.tiny()` widths and the released ViT
depth of 39 (the release config is patched to it): a flat fp16 EVA state dict with 40 blocks and
EVA-CLIP's head, a BLIP-2 `{"model": ...}` with the Q-Former's text-side keys, t5_proj and buffers,
and a Video-LLaMA training-run checkpoint.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from convert_weights import main as convert_main
from vllama_jax import random_checkpoint
from vllama_jax.config import LlamaConfig
from vllama_jax.convert import tree
from vllama_jax.convert import video_branch as vb
from vllama_jax.errors import CheckpointError, ConfigError
from vllama_jax.models.video_branch import VideoBranch, VideoBranchConfig
from vllama_jax.pretrained import load_llama, load_video_branch
from vllama_jax.sharding import abstract_model

HIDDEN = 64


def tiny_release(llm_hidden_size, **runtime):
  """Tiny widths, but the released depth of 39 blocks, so the EVA file carries 40 as eva_vit_g.pth."""
  cfg = VideoBranchConfig.tiny(llm_hidden_size, **runtime)
  return cfg.replace(vit=cfg.vit.replace(depth=39))


TINY = vb.conversion_config(tiny_release(HIDDEN), None, None, "float32")
ABSTRACT = nnx.to_pure_dict(abstract_model(lambda: VideoBranch(TINY, rngs=nnx.Rngs(0)))[1])
FILES = ("eva", "blip2", "vl")


@pytest.fixture(autouse=True)
def release_is_tiny(monkeypatch):
  """convert_weights.py converts the release config; here that is the tiny one."""
  monkeypatch.setattr(VideoBranchConfig, "release", classmethod(lambda cls, h, **kw: tiny_release(h, **kw)))


def source_shape(rule: tree.Rule) -> tuple:
  if rule.shape is not None:
    return rule.shape
  (path, row, transform), = rule.targets
  shape = tree.get(ABSTRACT, path).shape
  return shape[::-1] if transform is tree.transpose else shape


def random_state(rules, seed, dtype=torch.float32) -> dict:
  generator = torch.Generator().manual_seed(seed)
  return {k: torch.randn(source_shape(r), generator=generator).to(dtype) for k, r in rules.items()}


@pytest.fixture(scope="module")
def states():
  """The three source state dicts, each with the extra keys its released file has."""
  generator = torch.Generator().manual_seed(10)
  randn = lambda *shape, dtype=torch.float32: torch.randn(shape, generator=generator).to(dtype)
  w, depth = TINY.vit.width, TINY.vit.depth
  eva = random_state(vb.eva_rules(TINY), 0, torch.float16)
  eva |= {k.replace("blocks.0.", f"blocks.{depth}."): randn(*v.shape, dtype=torch.float16)
          for k, v in eva.items() if k.startswith("blocks.0.")}  # the block BLIP-2 drops
  eva |= {"norm.weight": randn(w), "norm.bias": randn(w), "head.weight": randn(10, w), "head.bias": randn(10)}
  blip2 = random_state(vb.blip2_rules(TINY), 1) | {
      "t5_proj.weight": randn(16, 32), "t5_proj.bias": randn(16),
      # the text side of the BERT, which the video model never uses
      "Qformer.bert.embeddings.word_embeddings.weight": randn(30, 32),
      "Qformer.bert.embeddings.position_embeddings.weight": randn(12, 32),
      "Qformer.bert.encoder.layer.0.intermediate.dense.weight": randn(64, 32),
      "Qformer.bert.encoder.layer.1.output.dense.bias": randn(32),
      "Qformer.bert.encoder.layer.1.output.LayerNorm.weight": randn(32),
      "Qformer.cls.predictions.bias": randn(30),
      "Qformer.bert.embeddings.position_ids": torch.arange(512)[None]}
  vl = random_state(vb.vl_rules(TINY), 2) | {
      "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
      "video_Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
      "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": randn(8),
      "audio_encoder.modality_preprocessors.text.mask": torch.ones(77, 77, dtype=torch.bool),
      "audio_encoder.modality_postprocessors.audio.1.log_logit_scale": randn(1),
      "audio_encoder.modality_postprocessors.thermal.1.log_logit_scale": randn(1)}
  # The names and layouts the released files use, independently of the rules.
  assert "ln_vision.weight" in blip2 and "ln_vision.weight" not in eva
  assert tuple(eva["patch_embed.proj.weight"].shape) == (w, 3, 14, 14)
  assert tuple(eva["cls_token"].shape) == (1, 1, w)
  assert tuple(eva["blocks.1.attn.qkv.weight"].shape) == (3 * w, w)
  assert tuple(vl["video_frame_position_embedding.weight"].shape) == (TINY.max_frames, 32)
  assert tuple(vl["llama_proj.weight"].shape) == (HIDDEN, 32)
  assert tuple(vl["video_query_tokens"].shape) == (1, TINY.video_qformer.num_query_tokens, 32)
  return {"eva": eva, "blip2": blip2, "vl": vl}


def write_sources(directory, states, vl_model_entry=True) -> dict:
  """eva_vit_g.pth (flat), blip2.pth and the VL training-run checkpoint under `directory`."""
  os.makedirs(directory, exist_ok=True)
  paths = {name: os.path.join(str(directory), f"{name}.pth") for name in FILES}
  torch.save(states["eva"], paths["eva"])
  torch.save({"model": states["blip2"]}, paths["blip2"])
  vl = {"model": states["vl"], "optimizer": {"state": {}}, "config": {"run": {"lr": 1e-4}}, "scaler": {},
        "epoch": 4}
  torch.save(vl if vl_model_entry else states["vl"], paths["vl"])
  return paths


def write_safetensors_sources(directory, states) -> dict:
  """The same three state dicts as flat .safetensors files (no training-run wrapper)."""
  from safetensors.torch import save_file
  os.makedirs(directory, exist_ok=True)
  paths = {name: os.path.join(str(directory), f"{name}.safetensors") for name in FILES}
  for name in FILES:
    save_file({k: v.contiguous() for k, v in states[name].items()}, paths[name])
  return paths


def cli(paths, out, *extra, vl=True):
  args = ["--eva", paths["eva"], "--blip2", paths["blip2"], "--out", str(out), *extra]
  return convert_main(args + (["--vl-ckpt", paths["vl"]] if vl else []))


def numpy(t: torch.Tensor) -> np.ndarray:
  return t.float().numpy() if t.dtype.is_floating_point else t.numpy()


def assert_converted(params, states, dtype=np.float32):
  """Every source tensor where its rule puts it, plus layout checks written out by hand."""
  for name, rules in (("eva", vb.eva_rules(TINY)), ("blip2", vb.blip2_rules(TINY)), ("vl", vb.vl_rules(TINY))):
    for key, rule in rules.items():
      for path, row, transform in rule.targets:
        actual = np.asarray(tree.get(params, path))
        actual = actual if row is None else actual[row]
        expected = numpy(states[name][key])
        expected = transform(expected) if transform is not None else expected
        np.testing.assert_array_equal(actual, expected.astype(dtype), err_msg=key)
  eva, blip2, vl = (states[name] for name in FILES)
  v, w = params["visual_encoder"], TINY.vit.width
  qkv = numpy(eva["blocks.1.attn.qkv.weight"])
  for j, name in enumerate("qkv"):
    np.testing.assert_array_equal(v["blocks"]["attn"][name]["kernel"][1], qkv[j * w:(j + 1) * w].T.astype(dtype))
  conv = numpy(eva["patch_embed.proj.weight"])  # torch (out, in, kh, kw)
  assert v["patch_embed"]["kernel"][2, 5, 1, 7] == conv[7, 1, 2, 5].astype(dtype)
  np.testing.assert_array_equal(v["cls_token"], numpy(eva["cls_token"])[0, 0].astype(dtype))
  np.testing.assert_array_equal(v["ln_vision"]["scale"], numpy(blip2["ln_vision.weight"]).astype(dtype))
  np.testing.assert_array_equal(
      params["qformer"]["layers"][2]["crossattention"]["key"]["kernel"],
      numpy(blip2["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"]).T.astype(dtype))
  np.testing.assert_array_equal(params["video_qformer"]["query_tokens"], numpy(vl["video_query_tokens"]))
  np.testing.assert_array_equal(params["frame_position_embedding"],
                                numpy(vl["video_frame_position_embedding.weight"]))
  np.testing.assert_array_equal(params["llama_proj"]["kernel"], numpy(vl["llama_proj.weight"]).T)
  np.testing.assert_array_equal(params["llama_proj"]["bias"], numpy(vl["llama_proj.bias"]))


def test_round_trip_through_the_cli(tmp_path, states, capsys):
  paths = write_sources(tmp_path / "src", states)
  out = tmp_path / "out"
  assert cli(paths, out, "--llm-hidden", str(HIDDEN), "--dtype", "float32") == 0
  assert "video branch" in capsys.readouterr().out
  entry = json.loads((out / "config.json").read_text())[vb.VIDEO_BRANCH]
  assert entry["initialised"] == []
  assert entry["sources"] == {"eva": "eva.pth", "blip2": "blip2.pth", "vl_ckpt": "vl.pth"}
  assert vb.video_branch_config_from_entry(entry) == TINY
  assert vb.video_branch_config_from_entry(entry, interpolate_frame_positions=True).interpolate_frame_positions
  with pytest.raises(ConfigError, match="invalid"):
    vb.video_branch_config_from_entry(entry, frames=3)
  model = load_video_branch(str(out))
  assert model.config == TINY
  assert_converted(nnx.to_pure_dict(nnx.state(model)), states)
  frames = np.random.default_rng(0).standard_normal((2, 3, 28, 28, 3)).astype(np.float32)
  tokens = model(jnp.asarray(frames))
  assert tokens.shape == (2, TINY.video_qformer.num_query_tokens, HIDDEN)
  assert np.isfinite(np.asarray(tokens)).all()


def test_llm_width_comes_from_the_vl_checkpoint(tmp_path, states):
  paths = write_sources(tmp_path, states)
  assert vb.conversion_config(None, None, paths["vl"], "float32").llm_hidden_size == HIDDEN
  assert vb.conversion_config(None, 48, paths["vl"], "float32").llm_hidden_size == 48  # then checked
  with pytest.raises(CheckpointError, match="--llm-hidden"):
    vb.conversion_config(None, None, None, "float32")


def expect_error(tmp_path, paths, capsys, *messages, extra=("--llm-hidden", str(HIDDEN)), vl=True):
  out = tmp_path / "out_failed"
  assert cli(paths, out, *extra, vl=vl) == 2
  err = capsys.readouterr().err
  for message in messages:
    assert message in err, err
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".converting-")]
  return err


@pytest.mark.parametrize("name, key", [
    ("eva", "fc_norm.weight"),  # only EVA-CLIP's norm.* and head.* are dropped on purpose
    ("blip2", "visual_encoder.blocks.0.norm1.weight"),
    ("blip2", "Qformer.vision_proj.weight"),
    ("vl", "audio_query_tokens"),  # AL-branch keys do not belong to the video branch
    ("vl", "audio_Qformer.bert.encoder.layer.0.attention.self.query.weight"),
])
def test_unexpected_key_is_named_with_its_file(tmp_path, states, capsys, name, key):
  changed = dict(states, **{name: states[name] | {key: torch.zeros(3)}})
  paths = write_sources(tmp_path / "src", changed)
  err = expect_error(tmp_path, paths, capsys, f"error: {paths[name]}: unexpected keys: {key} (in {paths[name]})")
  assert "missing" not in err and "position_ids" not in err and "t5_proj" not in err


@pytest.mark.parametrize("name, key", [
    ("eva", "blocks.1.mlp.fc2.bias"),
    ("blip2", "ln_vision.bias"),
    ("vl", "video_Qformer.bert.encoder.layer.1.output_query.dense.bias"),
    ("vl", "llama_proj.bias"),
])
def test_missing_key_is_named_with_its_file(tmp_path, states, capsys, name, key):
  changed = dict(states, **{name: {k: v for k, v in states[name].items() if k != key}})
  paths = write_sources(tmp_path / "src", changed)
  expect_error(tmp_path, paths, capsys, f"error: {paths[name]}: missing keys: {key}")


def test_mis_shaped_keys_are_named(tmp_path, states, capsys):
  table = "video_frame_position_embedding.weight"
  changed = dict(states, vl=states["vl"] | {table: torch.zeros(16, 32)})
  paths = write_sources(tmp_path / "src", changed)
  expect_error(tmp_path, paths, capsys, f"{table} (in {paths['vl']}) has shape (16, 32), expected (8, 32)")
  paths = write_sources(tmp_path / "src", states)  # an LLM width that does not fit llama_proj
  expect_error(tmp_path, paths, capsys, f"llama_proj.weight (in {paths['vl']}) has shape (64, 32), "
               "expected (48, 32)", extra=("--llm-hidden", "48"))


def test_vl_checkpoint_without_model_entry(tmp_path, states, capsys):
  paths = write_sources(tmp_path / "src", states, vl_model_entry=False)
  expect_error(tmp_path, paths, capsys, paths["vl"], "expected a training-run checkpoint with a 'model' state dict")


@pytest.mark.parametrize("name", FILES)
def test_truncated_file_is_named(tmp_path, states, capsys, name):
  paths = write_sources(tmp_path / "src", states)
  with open(paths[name], "r+b") as f:
    f.truncate(os.path.getsize(paths[name]) // 2)
  expect_error(tmp_path, paths, capsys, paths[name], "truncated or corrupt")


def test_missing_file_is_named_before_anything_is_read(tmp_path, states, capsys):
  paths = write_sources(tmp_path / "src", states)
  os.remove(paths["blip2"])
  expect_error(tmp_path, paths, capsys, f"{paths['blip2']}: no such file")


def test_without_vl_checkpoint_trainables_are_initialised(tmp_path, states, capsys):
  paths = write_sources(tmp_path / "src", states)
  out = tmp_path / "out"
  assert cli(paths, out, "--llm-hidden", str(HIDDEN), "--dtype", "float32", "--seed", "3", vl=False) == 0
  assert "initialised: video_qformer, frame_position_embedding, llama_proj" in capsys.readouterr().out
  entry = json.loads((out / "config.json").read_text())[vb.VIDEO_BRANCH]
  assert entry["initialised"] == list(vb.TRAINABLE) and entry["sources"]["vl_ckpt"] is None
  params = nnx.to_pure_dict(nnx.state(load_video_branch(str(out))))
  reference = nnx.to_pure_dict(nnx.state(VideoBranch(TINY, rngs=nnx.Rngs(3))))  # as VideoBranch inits them
  for name in vb.TRAINABLE:  # jit (conversion) and eager (here) give the same draws to within an ulp
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7),
                 params[name], reference[name])
  table = np.asarray(params["frame_position_embedding"])
  assert abs(table.std() - 1.0) < 0.15 and abs(table.mean()) < 0.15  # N(0, 1) as nn.Embedding
  np.testing.assert_array_equal(params["visual_encoder"]["ln_vision"]["bias"],
                                numpy(states["blip2"]["ln_vision.bias"]))


def test_vl_stage_1_can_start_llama_proj_from_minigpt4(tmp_path, states, capsys):
  paths = write_sources(tmp_path / "src", states)
  minigpt4 = str(tmp_path / "src" / "pretrained_minigpt4_7b.pth")
  proj = {k: states["vl"][k] for k in ("llama_proj.weight", "llama_proj.bias")}
  torch.save({"model": proj}, minigpt4)  # MiniGPT-4's file: only its projection, under "model"
  out = tmp_path / "out"
  assert cli(paths, out, "--minigpt4", minigpt4, "--dtype", "float32", "--seed", "3", vl=False) == 0
  assert "initialised: video_qformer, frame_position_embedding)" in capsys.readouterr().out
  entry = json.loads((out / "config.json").read_text())[vb.VIDEO_BRANCH]
  assert entry["initialised"] == ["video_qformer", "frame_position_embedding"]
  assert entry["sources"]["minigpt4"] == "pretrained_minigpt4_7b.pth" and entry["llm_hidden_size"] == HIDDEN
  params = nnx.to_pure_dict(nnx.state(load_video_branch(str(out))))
  np.testing.assert_array_equal(params["llama_proj"]["kernel"], numpy(proj["llama_proj.weight"]).T)
  np.testing.assert_array_equal(params["llama_proj"]["bias"], numpy(proj["llama_proj.bias"]))
  reference = nnx.to_pure_dict(nnx.state(VideoBranch(TINY, rngs=nnx.Rngs(3))))
  np.testing.assert_allclose(params["video_qformer"]["query_tokens"], reference["video_qformer"]["query_tokens"],
                             rtol=1e-6, atol=1e-7)
  torch.save({"model": proj | {"llama_proj.extra": torch.zeros(1)}}, minigpt4)
  expect_error(tmp_path, paths, capsys, minigpt4, "llama_proj.extra", extra=("--minigpt4", minigpt4), vl=False)
  with pytest.raises(SystemExit):  # the VL checkpoint has its own llama_proj
    cli(paths, tmp_path / "both", "--minigpt4", minigpt4)


def test_without_llm_width_the_error_says_how_to_give_it(tmp_path, states, capsys):
  paths = write_sources(tmp_path / "src", states)
  expect_error(tmp_path, paths, capsys, "--llama", "--llm-hidden", extra=(), vl=False)


def test_existing_output_is_never_overwritten(tmp_path, states, capsys):
  paths = write_sources(tmp_path / "src", states)
  out = tmp_path / "mine"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  assert cli(paths, out, "--llm-hidden", str(HIDDEN)) == 2
  assert "already exists and is not empty" in capsys.readouterr().err
  assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


def test_llama_and_video_branch_in_one_directory(tmp_path, states):
  llama_cfg = LlamaConfig(vocab_size=384, hidden_size=HIDDEN, intermediate_size=172, num_layers=2,
                          num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, dtype="float32")
  llama_dir = str(tmp_path / "llama")
  random_checkpoint.write_hf_llama(llama_dir, llama_cfg)
  random_checkpoint.write_tokenizer(llama_dir)
  paths = write_sources(tmp_path / "src", states)
  out = tmp_path / "out"
  assert cli(paths, out, "--llama", llama_dir) == 0  # the LLM width comes from --llama; bfloat16
  assert sorted(json.loads((out / "config.json").read_text())) == ["chat", "llama", vb.VIDEO_BRANCH]
  llama = load_llama(str(out))
  branch = load_video_branch(str(out))
  assert llama.embed_tokens[...].dtype == ml_dtypes.bfloat16
  params = nnx.to_pure_dict(nnx.state(branch))
  frozen = (params["visual_encoder"]["blocks"]["attn"]["q"]["kernel"], params["visual_encoder"]["ln_vision"]["scale"],
            params["qformer"]["query_tokens"])
  trainable = (params["video_qformer"]["query_tokens"], params["frame_position_embedding"],
               params["llama_proj"]["kernel"])
  assert {a.dtype for a in frozen} == {jnp.dtype("bfloat16")}
  assert {a.dtype for a in trainable} == {jnp.dtype("float32")}
  bf16 = vb.conversion_config(TINY, None, None, "bfloat16")
  assert branch.config == bf16.replace(llm_hidden_size=HIDDEN)
  assert_converted(jax_to_float32(params), {k: bf16_round(s) if k != "vl" else s for k, s in states.items()})
  tokens = branch(jnp.zeros((1, 2, 28, 28, 3)))
  assert tokens.shape == (1, TINY.video_qformer.num_query_tokens, llama.config.hidden_size)


def jax_to_float32(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def bf16_round(state):
  """Source tensors as the bfloat16 conversion stores them, back in float32."""
  return {k: v.to(torch.bfloat16).float() if v.dtype.is_floating_point else v for k, v in state.items()}


def test_safetensors_sources_convert_the_same(tmp_path, states):
  paths = write_safetensors_sources(tmp_path / "src", states)
  assert cli(paths, tmp_path / "out", "--llm-hidden", str(HIDDEN), "--dtype", "float32") == 0
  assert_converted(nnx.to_pure_dict(nnx.state(load_video_branch(str(tmp_path / "out")))), states)
