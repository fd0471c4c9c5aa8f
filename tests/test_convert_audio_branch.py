"""convert_weights.py --imagebind/--al-ckpt: the audio branch from synthetic files in the released
layouts (a flat ImageBind state dict with all six modalities; a Video-LLaMA training-run checkpoint),
checked end to end against the PyTorch composition of test_audio_branch."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert_weights import main as convert_main
from imagebind_reference import reference_model
from test_audio_branch import CFG, torch_branch
from test_qformer import hf_qformer, lavis_tensors
from vllama_jax.convert import audio_branch as ab
from vllama_jax.convert.qformer import AUDIO_KEYS
from vllama_jax.models.audio_branch import AudioBranchConfig
from vllama_jax.pretrained import load_audio_branch

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def release_is_tiny(monkeypatch):
  monkeypatch.setattr(AudioBranchConfig, "release", classmethod(lambda cls, h, **kw: CFG.replace(llm_hidden_size=h)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """(torch parts, imagebind_huge.pth path, AL checkpoint path)."""
  directory = tmp_path_factory.mktemp("audio_sources")
  imagebind = reference_model(CFG.audio, CFG.vision, seed=11)
  qformer = hf_qformer(CFG.qformer, seed=12)
  tensors, tokens = lavis_tensors(qformer, CFG.qformer, AUDIO_KEYS, seed=13)
  positions = torch.randn(CFG.num_positions, CFG.qformer.encoder_width)
  proj = torch.nn.Linear(CFG.qformer.hidden_size, CFG.llm_hidden_size)
  imagebind_path = str(directory / "imagebind_huge.pth")
  torch.save(imagebind.state_dict(), imagebind_path)
  model = {key: torch.as_tensor(value) for _, key, value in tensors} | {
      "audio_position_embedding.weight": positions,
      "audio_llama_proj.weight": proj.weight.detach(), "audio_llama_proj.bias": proj.bias.detach(),
      # buffers a training run saves beside the trainables
      "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
      "audio_encoder.modality_preprocessors.text.mask": torch.zeros(77, 77),
      "audio_encoder.modality_postprocessors.audio.1.log_logit_scale": torch.tensor(3.0),
  }
  al_path = str(directory / "al.pth")
  torch.save({"model": model, "optimizer": {"state": {}}, "config": {"run": {}}, "scaler": {}, "epoch": 2}, al_path)
  parts = dict(imagebind=imagebind, qformer=qformer, tokens=tokens, positions=positions, proj=proj)
  return parts, imagebind_path, al_path


def test_round_trip_matches_the_pytorch_composition(sources, tmp_path, capsys):
  parts, imagebind_path, al_path = sources
  out = tmp_path / "out"
  assert convert_main(["--imagebind", imagebind_path, "--al-ckpt", al_path, "--out", str(out),
                       "--dtype", "float32"]) == 0  # LLM width from audio_llama_proj
  assert "audio branch" in capsys.readouterr().out
  entry = json.loads((out / "config.json").read_text())[ab.AUDIO_BRANCH]
  assert entry["initialised"] == [] and entry["sources"]["al_ckpt"] == "al.pth"
  branch = load_audio_branch(str(out))
  assert branch.config == ab.conversion_config(CFG, None, None, "float32")
  x = np.random.default_rng(0).standard_normal((2, 8, 1, *CFG.audio.input_size)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(branch.encode_audio(jnp.asarray(x)))
  assert np.abs(got - torch_branch(parts, "audio", x)).max() <= TOLERANCE
  frames = np.random.default_rng(1).standard_normal((1, 2, 224, 224, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(branch.encode_frames(jnp.asarray(frames)))
  assert np.abs(got - torch_branch(parts, "vision", frames.transpose(0, 1, 4, 2, 3))).max() <= TOLERANCE


def test_without_al_checkpoint_trainables_are_initialised(sources, tmp_path, capsys):
  _, imagebind_path, _ = sources
  out = tmp_path / "out"
  assert convert_main(["--imagebind", imagebind_path, "--llm-hidden", "64", "--out", str(out)]) == 0
  assert "initialised: audio_position_embedding, audio_qformer, audio_llama_proj" in capsys.readouterr().out
  branch = load_audio_branch(str(out))
  assert abs(float(np.asarray(branch.audio_position_embedding[...]).std()) - 1.0) < 0.3  # N(0, 1)
  assert branch.audio_encoder.stem.kernel[...].dtype == jnp.bfloat16  # frozen parts in --dtype


def rewrite_al(path, tmp_path, edit):
  checkpoint = torch.load(path, weights_only=True)
  edit(checkpoint["model"])
  new = str(tmp_path / "al_edited.pth")
  torch.save(checkpoint, new)
  return new


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update({"video_query_tokens": torch.zeros(1, 4, 32)}), "unexpected keys: video_query_tokens"),
    (lambda m: m.pop("audio_position_embedding.weight"), "missing keys: audio_position_embedding.weight"),
    (lambda m: m.update({"audio_position_embedding.weight": torch.zeros(9, 32)}),
     "audio_position_embedding.weight (in"),
])
def test_al_checkpoint_errors_name_the_key_and_file(sources, tmp_path, capsys, edit, message):
  _, imagebind_path, al_path = sources
  edited = rewrite_al(al_path, tmp_path, edit)
  assert convert_main(["--imagebind", imagebind_path, "--al-ckpt", edited, "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert message in err and "al_edited.pth" in err
  assert not (tmp_path / "o").exists()


def test_imagebind_file_errors(sources, tmp_path, capsys):
  _, imagebind_path, _ = sources
  state = torch.load(imagebind_path, weights_only=True)
  state.pop("modality_trunks.audio.blocks.1.attn.bias_k")
  state["modality_trunks.audio.blocks.0.attn.extra"] = torch.zeros(3)
  broken = str(tmp_path / "ib.pth")
  torch.save(state, broken)
  assert convert_main(["--imagebind", broken, "--llm-hidden", "64", "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "missing keys: modality_trunks.audio.blocks.1.attn.bias_k" in err
  assert "unexpected keys: modality_trunks.audio.blocks.0.attn.extra" in err
  truncated = str(tmp_path / "cut.pth")
  with open(imagebind_path, "rb") as f, open(truncated, "wb") as g:
    g.write(f.read()[: os.path.getsize(imagebind_path) // 2])
  assert convert_main(["--imagebind", truncated, "--llm-hidden", "64", "--out", str(tmp_path / "o")]) == 2
  assert "cut.pth" in capsys.readouterr().err
