"""The whole Video-LLaMA, end to end: released-format files -> convert_weights.py -> from_pretrained,
against a PyTorch composition, fp32.

The sources are written with torch at tiny widths (the video branch at the released ViT depth of 39):
eva_vit_g.pth (flat, fp16, 40 blocks), blip2_pretrained_flant5xxl.pth, imagebind_huge.pth, a Hugging
Face LLaMA directory with its tokenizer, and VL / AL training-run checkpoints. The PyTorch side is
transformers' Blip2 vision / Q-Former models, imagebind-unofficial and LlamaForCausalLM; the glue
(test_video_branch.TorchVideoBranch, test_audio_branch.torch_branch) and the prompt assembly
(`Chat.get_context_emb`, below) are written in the tests from the spec. Matrices are rescaled to unit
variance so that the media really move the logits (see `unit_variance`).
"""

import dataclasses
import filecmp
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from flax import nnx

from conftest import hf_llama
from convert_weights import main as convert_main
from imagebind_reference import reference_model
from test_audio_branch import CFG as AUDIO, torch_branch
from test_convert_video_branch import tiny_release
from test_qformer import hf_qformer, lavis_tensors
from test_video_branch import TorchVideoBranch
from vllama_jax.convert import release
from vllama_jax.convert.qformer import AUDIO_KEYS, IMAGE_KEYS, VIDEO_KEYS
from vllama_jax.infer.generate import Generator
from vllama_jax.infer.sampling import SamplingConfig
from vllama_jax.models.audio_branch import AudioBranchConfig
from vllama_jax.models.video_branch import VideoBranchConfig
from vllama_jax.models.video_llama import VideoLLaMA
from vllama_jax.random_checkpoint import write_tokenizer
from vllama_jax.text.prompt import layout
from vllama_jax.text.tokenizer import Tokenizer

HIDDEN = 64
VIDEO = tiny_release(HIDDEN)
TOLERANCE = 1e-4
NEW_TOKENS = 8
PLACEHOLDER, AUDIO_PLACEHOLDER = "<ImageHere>", "<AudioHere>"
EVA, BLIP2, IMAGEBIND = "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "imagebind_huge.pth"
VL, AL, LLAMA_DIR = "VL_LLaMA_2_7B_Finetuned.pth", "AL_LLaMA_2_7B_Finetuned.pth", "llama-2-7b-chat-hf"

SYSTEM = ("You are able to understand the visual content that the user provides. Follow the instructions "
          "carefully and explain your answers in detail.")
PROMPTS = {  # spec 4.2, in the LLaMA-2 chat template
    "video": f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n<Video><ImageHere></Video> The video contains 8 frames "
             "sampled at 0.0, 1.0, 2.0 seconds. What is happening in this video? [/INST]",
    "image": f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n<Image><ImageHere></Image> Describe this image. [/INST]",
    "audio+video": "[INST] <<SYS>>\n\n<</SYS>>\n\nClose your eyes, open your ears and you imagine only based on "
                   "the sound that: <ImageHere>." + " " * 17 + "Close your ears, open your eyes and you see that "
                   "<Video><ImageHere></Video>." + " " * 18 + "Now answer my question based on what you have "
                   "just seen and heard. What do you hear? [/INST]",
}


@pytest.fixture(scope="module", autouse=True)
def release_is_tiny():
  """convert_weights.py converts the release configs; here they are the tiny ones."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(VideoBranchConfig, "release", classmethod(lambda cls, h, **kw: tiny_release(h, **kw)))
    mp.setattr(AudioBranchConfig, "release", classmethod(lambda cls, h, **kw: AUDIO.replace(llm_hidden_size=h)))
    yield


def tensors(triples) -> dict:
  return {key: torch.as_tensor(value) for _, key, value in triples}


def unit_variance(module):
  """Scales every matrix (Linear weight, embedding table) to std 1/sqrt(fan-in), or 1 for the token
  table, in place. The references draw BERT's N(0, 0.02), under which a Q-Former's queries barely see
  its encoder and the LLM barely sees its prompt: frames would then move the logits by less than the
  tolerance, and parity would say little."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 2:
        p.mul_((1.0 if "embed_tokens" in name else p.shape[1] ** -0.5) / p.std())


def lively_qformer(qformer, cfg, keys, tokens):
  """`unit_variance(qformer)` and its LAVIS tensors, with the given query tokens."""
  unit_variance(qformer)
  triples, _ = lavis_tensors(qformer, cfg, keys)
  return [(f, k, tokens.numpy() if k == keys[1] else v) for f, k, v in triples], tokens


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """(torch parts, {name: path}) with the released files written under one directory."""
  from test_eva_vit import lavis_state_dict
  video = TorchVideoBranch(VIDEO, seed=20).eval()
  with torch.no_grad():  # eva_vit_g.pth is stored in fp16: the reference runs on the rounded weights
    for name, p in video.vision.named_parameters():
      if not name.startswith("post_layernorm"):
        p.copy_(p.half().float())
  video.image_keys = lively_qformer(video.image_qformer, VIDEO.image_qformer, IMAGE_KEYS, video.image_keys[1])
  video.video_keys = lively_qformer(video.video_qformer, VIDEO.video_qformer, VIDEO_KEYS, video.video_keys[1])
  unit_variance(video.llama_proj)
  imagebind = reference_model(AUDIO.audio, AUDIO.vision, seed=30)
  audio_qformer = hf_qformer(AUDIO.qformer, seed=31)
  _, audio_tokens = lavis_tensors(audio_qformer, AUDIO.qformer, AUDIO_KEYS, seed=32)
  audio_triples, _ = lively_qformer(audio_qformer, AUDIO.qformer, AUDIO_KEYS, audio_tokens)
  positions = torch.randn(AUDIO.num_positions, AUDIO.qformer.encoder_width, generator=torch.Generator().manual_seed(33))
  torch.manual_seed(34)
  audio_proj = torch.nn.Linear(AUDIO.qformer.hidden_size, HIDDEN)
  llama, llama_dir = hf_llama(tmp_path_factory, "hf_llama", seed=40, save=False)
  unit_variance(llama)
  llama.save_pretrained(llama_dir)
  write_tokenizer(llama_dir, vocab_size=llama.config.vocab_size)

  directory = tmp_path_factory.mktemp("released")
  paths = {name: str(directory / name) for name in (EVA, BLIP2, IMAGEBIND, VL, AL)} | {LLAMA_DIR: llama_dir}
  lavis = {k: torch.as_tensor(v) for k, v in lavis_state_dict(video.vision, VIDEO.vit).items()}
  eva = {k: v.half() for k, v in lavis.items() if not k.startswith("ln_vision.")}
  depth, width = VIDEO.vit.depth, VIDEO.vit.width
  eva |= {k.replace("blocks.0.", f"blocks.{depth}."): torch.randn_like(v.float()).half()  # the block BLIP-2 drops
          for k, v in eva.items() if k.startswith("blocks.0.")}
  eva |= {"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width), "head.weight": torch.zeros(10, width),
          "head.bias": torch.zeros(10)}
  torch.save(eva, paths[EVA])
  blip2 = tensors(video.image_keys[0]) | {k: v for k, v in lavis.items() if k.startswith("ln_vision.")} | {
      "t5_proj.weight": torch.randn(16, 32), "t5_proj.bias": torch.randn(16)}
  torch.save({"model": blip2}, paths[BLIP2])
  run = {"optimizer": {"state": {}}, "config": {"run": {"lr": 1e-4}}, "scaler": {}, "epoch": 4}
  buffers = {"llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
             "audio_encoder.modality_preprocessors.text.mask": torch.ones(77, 77, dtype=torch.bool),
             "audio_encoder.modality_postprocessors.audio.1.log_logit_scale": torch.tensor(3.0)}
  vl = tensors(video.video_keys[0]) | buffers | {
      "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
      "video_frame_position_embedding.weight": video.frame_positions.weight.detach(),
      "llama_proj.weight": video.llama_proj.weight.detach(), "llama_proj.bias": video.llama_proj.bias.detach()}
  torch.save(run | {"model": vl}, paths[VL])
  torch.save(imagebind.state_dict(), paths[IMAGEBIND])
  al = tensors(audio_triples) | buffers | {
      "audio_position_embedding.weight": positions,
      "audio_llama_proj.weight": audio_proj.weight.detach(), "audio_llama_proj.bias": audio_proj.bias.detach()}
  torch.save(run | {"model": al}, paths[AL])
  audio = dict(imagebind=imagebind, qformer=audio_qformer, tokens=audio_tokens, positions=positions, proj=audio_proj)
  return dict(video=video, audio=audio, llama=llama), paths


def explicit_args(paths, out) -> list[str]:
  return ["--llama", paths[LLAMA_DIR], "--eva", paths[EVA], "--blip2", paths[BLIP2], "--vl-ckpt", paths[VL],
          "--imagebind", paths[IMAGEBIND], "--al-ckpt", paths[AL], "--out", str(out), "--dtype", "float32"]


@pytest.fixture(scope="module")
def converted(release_is_tiny, sources, tmp_path_factory):
  out = tmp_path_factory.mktemp("e2e") / "converted"
  assert convert_main(explicit_args(sources[1], out)) == 0
  return out


@pytest.fixture(scope="module")
def model(converted):
  return VideoLLaMA.from_pretrained(str(converted))


@pytest.fixture(scope="module")
def tokenizer(converted, model):
  tok = Tokenizer(str(converted))
  vocab = model.llama.config.vocab_size
  assert tok.vocab_size == vocab  # the HF config's vocab is the base tokenizer's
  assert tok.add_tokens([PLACEHOLDER, AUDIO_PLACEHOLDER]) == [vocab, vocab + 1]  # never embedded
  return tok


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(5)
  frames = lambda t: rng.standard_normal((1, t, VIDEO.vit.image_size, VIDEO.vit.image_size, 3)).astype(np.float32)
  audio = rng.standard_normal((1, 8, 1, *AUDIO.audio.input_size)).astype(np.float32)
  return {"video": (frames(8), None), "image": (frames(1), None), "audio+video": (frames(8), audio)}


# ---- the PyTorch side ------------------------------------------------------------------------------

def torch_modalities(parts, frames, audio) -> list[torch.Tensor]:
  """Modality embeddings in placeholder order: audio first, then video."""
  out = []
  if audio is not None:
    out.append(torch.tensor(torch_branch(parts["audio"], "audio", audio)))
  with torch.no_grad():
    out.append(parts["video"](torch.tensor(frames.transpose(0, 1, 4, 2, 3))))
  return out


def torch_context(llama, sp, prompt, modalities):
  """Chat.get_context_emb: each segment tokenised alone, BOS on the first only, embeddings concatenated.
  Returns (embeds (1, L, H), ids, source) with the layout written out independently."""
  segments = prompt.split(PLACEHOLDER)
  assert len(segments) == len(modalities) + 1
  pieces, ids, source, row = [], [], [], 0
  with torch.no_grad():
    for i, segment in enumerate(segments):
      tokens = ([sp.bos_id()] if i == 0 else []) + sp.encode(segment)
      pieces.append(llama.model.embed_tokens(torch.tensor([tokens], dtype=torch.long)))
      ids += tokens
      source += [-1] * len(tokens)
      if i < len(modalities):
        n = modalities[i].shape[1]
        pieces.append(modalities[i])
        ids += [0] * n
        source += range(row, row + n)
        row += n
  return torch.cat(pieces, dim=1), np.asarray(ids), np.asarray(source)


def torch_logits(llama, sp, prompt, modalities):
  """(logits (L, V), prompt embeddings (1, L, H), ids, source)."""
  embeds, ids, source = torch_context(llama, sp, prompt, modalities)
  with torch.no_grad():
    return llama(inputs_embeds=embeds).logits[0].numpy(), embeds, ids, source


def torch_greedy(llama, embeds):
  with torch.no_grad():
    tokens = llama.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
  return tokens[0].numpy()


# ---- ours ------------------------------------------------------------------------------------------

# Compiled once per shape, and shared by every model loaded here (the model is an argument).
encode_video = nnx.jit(lambda m, frames: m.encode_video(frames))
encode_audio = nnx.jit(lambda m, filterbanks: m.encode_audio(filterbanks))
forward = nnx.jit(lambda m, ids, source, modality: (m(ids, source, modality), m.embed(ids, source, modality)))


def our_run(model, tokenizer, prompt, frames, audio):
  """(ids, source, modality, logits, prompt embeddings) through our encoders and text.prompt.layout."""
  with jax.default_matmul_precision("highest"):
    rows = ([encode_audio(model, jnp.asarray(audio))] if audio is not None else []) + \
        [encode_video(model, jnp.asarray(frames))]
    lay = layout(tokenizer, prompt, [r.shape[1] for r in rows])
    ids, source, modality = jnp.asarray(lay.ids[None]), jnp.asarray(lay.source[None]), jnp.concatenate(rows, axis=1)
    logits, embeds = forward(model, ids, source, modality)
  return np.asarray(ids)[0], np.asarray(source)[0], modality, np.asarray(logits)[0], embeds[0]


@pytest.mark.parametrize("case", list(PROMPTS))
def test_logits_and_greedy_answer_match_the_pytorch_composition(sources, model, tokenizer, converted, inputs, case):
  parts = sources[0]
  frames, audio = inputs[case]
  sp = spm.SentencePieceProcessor(model_file=os.path.join(sources[1][LLAMA_DIR], "tokenizer.model"))
  llama, prompt = parts["llama"], PROMPTS[case]
  modalities = torch_modalities(parts, frames, audio)
  expected, expected_embeds, ref_ids, ref_source = torch_logits(llama, sp, prompt, modalities)
  expected_tokens = torch_greedy(llama, expected_embeds)
  ids, source, modality, logits, embeds = our_run(model, tokenizer, PROMPTS[case], frames, audio)
  with jax.default_matmul_precision("highest"):  # one length bucket for the three prompts
    out = Generator(model.llama, length_multiple=64)(
        [embeds], SamplingConfig(greedy=True, max_new_tokens=NEW_TOKENS, eos_token_id=None))
  np.testing.assert_array_equal(source, ref_source)
  text = ref_source < 0
  np.testing.assert_array_equal(ids[text], ref_ids[text])
  assert modality.shape[1] == (AUDIO.qformer.num_query_tokens if audio is not None else 0) + \
      VIDEO.video_qformer.num_query_tokens
  assert logits.dtype == np.float32 and logits.shape == expected.shape == (len(ref_ids), model.llama.config.vocab_size)
  assert np.abs(logits - expected).max() <= TOLERANCE
  assert list(out.lengths) == [NEW_TOKENS]
  np.testing.assert_array_equal(out.tokens[0], expected_tokens)
  # The tolerance is far below what the media do: reversed frames (frame positions) or video before
  # audio move the reference's logits by more than a hundred times it.
  changed = [modalities[::-1]] if audio is not None else []
  if frames.shape[1] > 1:
    changed.append(torch_modalities(parts, frames[:, ::-1].copy(), audio))
  for other in changed:
    assert np.abs(torch_logits(llama, sp, prompt, other)[0] - expected).max() > 100 * TOLERANCE


# ---- the Hugging Face repo layout --------------------------------------------------------------------

def run_cli(args) -> int:
  """convert_weights.main's exit status, whether returned or raised by argparse."""
  try:
    return convert_main(args)
  except SystemExit as e:
    return e.code


def hf_repo(root, paths, *extra_vl) -> str:
  """A local copy of DAMO-NLP-SG/Video-LLaMA-2-7B-Finetuned: LLaMA dir, VL, AL and ImageBind files."""
  repo = os.path.join(str(root), "Video-LLaMA-2-7B-Finetuned")
  shutil.copytree(paths[LLAMA_DIR], os.path.join(repo, LLAMA_DIR))
  for name in (VL, AL, IMAGEBIND) + extra_vl:
    shutil.copy(paths[name if name in paths else VL], os.path.join(repo, name))
  return repo


def test_hf_repo_layout_fetches_eva_and_blip2_and_converts_the_same(sources, converted, model, tokenizer, inputs,
                                                                     tmp_path, capsys, monkeypatch):
  paths = sources[1]
  repo = hf_repo(tmp_path, paths)
  # (a) offline: eva_vit_g.pth and BLIP-2 are named with their URLs and where they go
  failed = tmp_path / "offline"
  assert run_cli(["--hf-repo", repo, "--out", str(failed), "--offline", "--dtype", "float32"]) == 2
  err = capsys.readouterr().err
  for name in (EVA, BLIP2):
    assert f"{name} from {release.LAVIS}{name}; put it at {os.path.join(repo, name)}" in err, err
  assert "--eva" in err and "--blip2" in err and "offline" in err
  for flag in ("--imagebind", "--vl-ckpt", "--al-ckpt", "--llama:"):
    assert flag not in err, err
  assert not failed.exists()

  # (b) online, with eva / BLIP-2 fetched from file:// URLs of the copies outside the repo
  urls = {"eva": f"file://{paths[EVA]}", "blip2": f"file://{paths[BLIP2]}"}
  monkeypatch.setattr(release, "RELEASE_FILES", tuple(
      dataclasses.replace(s, url=urls.get(s.flag, "file:///nonexistent/" + s.flag)) if s.url else s
      for s in release.RELEASE_FILES))
  fetched = []
  original_download = release.download
  monkeypatch.setattr(release, "download", lambda url, dest: (fetched.append(url), original_download(url, dest)))
  monkeypatch.setattr(release, "hf_download", lambda *a: pytest.fail(f"hf_download{a} with everything in the repo"))
  out = tmp_path / "from_repo"
  assert run_cli(["--hf-repo", repo, "--out", str(out), "--dtype", "float32"]) == 0
  assert sorted(fetched) == sorted(urls.values())
  for name in (EVA, BLIP2):
    assert filecmp.cmp(os.path.join(repo, name), paths[name], shallow=False)
  assert not [f for f in os.listdir(repo) if f.endswith(".partial")]
  ours = VideoLLaMA.from_pretrained(str(out))
  case = "audio+video"
  np.testing.assert_array_equal(our_run(ours, tokenizer, PROMPTS[case], *inputs[case])[3],
                                our_run(model, tokenizer, PROMPTS[case], *inputs[case])[3])

  # (c) the chat template is guessed from the LLaMA directory's name
  config = json.loads((out / "config.json").read_text())
  assert config["chat"] == {"template": "llama_2"}
  explicit = json.loads((converted / "config.json").read_text())
  assert explicit["chat"]["template"] != "llama_2"  # "hf_llama0" says nothing
  assert config["video_branch"]["sources"] == {"eva": EVA, "blip2": BLIP2, "vl_ckpt": VL}
  assert config["audio_branch"]["sources"] == {"imagebind": IMAGEBIND, "al_ckpt": AL}
  strip = lambda c: {k: v for k, v in c.items() if k != "sources"}
  assert {k: strip(v) for k, v in config.items() if k != "chat"} == \
      {k: strip(v) for k, v in explicit.items() if k != "chat"}


def test_two_vl_checkpoints_in_the_repo_are_an_error_naming_both(sources, tmp_path, capsys):
  paths = sources[1]
  other = "VL_LLaMA_2_7B_Pretrained.pth"
  repo = hf_repo(tmp_path, paths, other)
  assert run_cli(["--hf-repo", repo, "--out", str(tmp_path / "o"), "--offline"]) == 2
  err = capsys.readouterr().err
  assert "--vl-ckpt" in err and VL in err and other in err, err
  assert not (tmp_path / "o").exists()
  # passing the one to use, as the error says, settles it; eva / BLIP-2 are still missing offline
  assert run_cli(["--hf-repo", repo, "--vl-ckpt", os.path.join(repo, VL), "--out", str(tmp_path / "o"),
                  "--offline"]) == 2
  err = capsys.readouterr().err
  assert "several candidates" not in err and EVA in err and BLIP2 in err, err
