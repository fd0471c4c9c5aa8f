"""The training loop on the synthetic dataset's smoke config: pre-emption (SIGTERM) and resume give
the losses of an uninterrupted run; the export loads for inference with the frozen weights linked
from the start directory; metrics and summaries are written."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from orbax_trees import assert_trees_close, export_contents
from vllama_jax.cli import load_config_file
from vllama_jax.errors import CheckpointError, ConfigError
from vllama_jax.infer.chat import VideoChat
from vllama_jax.pretrained import PARAMS_DIR
from vllama_jax.train import export, export_checkpoint, loop, synthetic_job

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic.py")
STEPS = 6


def quick_config(base):
  config = load_config_file(CONFIG + ":quick")
  with config.unlocked():
    config.synthetic.data_dir = str(base / "data")
    config.init_dir = str(base / "init")
    config.optimizer.iters_per_epoch = STEPS
    config.eval.every = 0
    config.log_every = 1
    config.progress = False
    config.checkpoint.every = 0  # off: only pre-emption and the end save
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  base = tmp_path_factory.mktemp("synthetic")
  config = quick_config(base)
  synthetic_job.setup(config, str(base / "setup"), log=lambda *_: None)
  return base


@pytest.fixture(scope="module")
def uninterrupted(prepared):
  config = quick_config(prepared)
  synthetic_job.setup(config, str(prepared / "a"), log=lambda *_: None)
  return loop.train(config, str(prepared / "a"), log=lambda *_: None), config


def test_sigterm_then_resume_reproduces_the_uninterrupted_losses(prepared, uninterrupted, monkeypatch):
  full, _ = uninterrupted
  assert len(full.losses) == STEPS and full.step == STEPS
  config = quick_config(prepared)
  workdir = str(prepared / "b")
  synthetic_job.setup(config, workdir, log=lambda *_: None)
  with config.unlocked():
    config.log_every = 4  # the stop comes mid-window: its part-window is logged
  batches = []

  def batch_then_preempt(*args):
    batches.append(1)
    if len(batches) == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # what a pre-empted TPU VM receives, during step 2
    return global_batch(*args)

  global_batch = loop.global_batch
  monkeypatch.setattr(loop, "global_batch", batch_then_preempt)
  first = loop.train(config, workdir, log=lambda *_: None)
  assert first.step == 2 and first.export_dir is None
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  # the stopped run's checkpoint exports without training; the finished run's export takes the link after
  step2 = export_checkpoint.export_checkpoint(workdir, log=lambda *_: None)
  assert os.path.basename(step2) == "export-step2" and os.readlink(os.path.join(workdir, "export")) == "export-step2"
  assert export.export_record(step2)["step"] == 2
  monkeypatch.setattr(loop, "global_batch", global_batch)
  second = loop.train(config, workdir, log=lambda *_: None)
  assert second.step == STEPS
  np.testing.assert_allclose(first.losses + second.losses, full.losses, rtol=1e-6, atol=0)
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in lines if r["split"] == "train"] == [2, 4, STEPS]
  # the same command again: nothing to train, the export stays
  again = loop.train(config, workdir, log=lambda *_: None)
  assert again.step == STEPS and again.losses == [] and export.exported_step(again.export_dir) == STEPS
  assert os.readlink(again.export_dir) == f"export-step{STEPS}"
  # one step more: a new export beside the one before, which stays where later stages may link into it
  with config.unlocked():
    config.steps = STEPS + 1
  longer = loop.train(config, workdir, log=lambda *_: None)
  assert longer.step == STEPS + 1 and len(longer.losses) == 1
  assert os.readlink(longer.export_dir) == f"export-step{STEPS + 1}"
  assert export.exported_step(os.path.join(workdir, f"export-step{STEPS}")) == STEPS
  # checkpoints deleted, the same command: a new run from scratch, whose export is its own
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  anew = loop.train(config, workdir, log=lambda *_: None)
  np.testing.assert_allclose(anew.losses[:STEPS], full.losses, rtol=1e-6, atol=0)
  assert os.readlink(anew.export_dir) == f"export-step{STEPS + 1}.1"
  assert export.export_record(anew.export_dir)["run"] != export.export_record(os.path.join(workdir, f"export-step{STEPS + 1}"))["run"]
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in lines if r["split"] == "train"] == [4, STEPS + 1]
  assert os.path.isfile(os.path.join(workdir, "metrics-previous.jsonl"))
  # a changed setting is refused before anything loads, and the workdir stays as it was
  with config.unlocked():
    config.optimizer.init_lr *= 2
  with pytest.raises(ConfigError, match="holds a run started with other settings"):
    loop.train(config, workdir, log=lambda *_: None)


def test_export_loads_with_linked_frozen_weights_and_changed_trainables(prepared, uninterrupted):
  result, config = uninterrupted
  params = os.path.join(result.export_dir, PARAMS_DIR)
  names = os.listdir(params)
  linked = [n for n in names if os.path.islink(os.path.join(params, n))]
  written = sorted(set(names) - set(linked))
  assert written and all(n.startswith(("video_branch.video_qformer", "video_branch.frame_position",
                                       "video_branch.llama_proj", "audio_branch.audio_")) for n in written)
  assert any(n.startswith("llama.") for n in linked) and any("visual_encoder" in n for n in linked)
  trained = VideoChat.from_pretrained(result.export_dir, template="llama_2")
  start = VideoChat.from_pretrained(config.init_dir, template="llama_2")
  before = np.asarray(start.model.video_branch.llama_proj.kernel[...])
  after = np.asarray(trained.model.video_branch.llama_proj.kernel[...])
  assert not np.array_equal(before, after)
  np.testing.assert_array_equal(np.asarray(start.model.llama.embed_tokens[...]),
                                np.asarray(trained.model.llama.embed_tokens[...]))
  video = os.path.join(config.synthetic.data_dir, "videos", "test", "test_00000.mp4")
  assert isinstance(trained.ask(video, "What colour is the shape?", greedy=True,
                                sampling=trained.sampling(max_new_tokens=4)), str)


def test_a_checkpoint_exports_what_the_run_exported(prepared, uninterrupted, tmp_path):
  result, config = uninterrupted
  workdir = str(prepared / "a")
  out = export_checkpoint.export_checkpoint(workdir, out=str(tmp_path / "again"), log=lambda *_: None)
  written, links = export_contents(out)
  by_the_run, run_links = export_contents(result.export_dir)
  assert sorted(written) == sorted(by_the_run) and links == run_links
  for name in written:
    assert_trees_close(written[name], by_the_run[name], rtol=0, atol=0)
  assert export.export_record(out) == export.export_record(result.export_dir)
  # into the workdir: its export-step6 already holds that model, nothing is written or relinked
  before = sorted(os.listdir(workdir))
  held = export_checkpoint.export_checkpoint(workdir, log=lambda *_: None)
  assert held == os.path.realpath(result.export_dir) and sorted(os.listdir(workdir)) == before
  with pytest.raises(CheckpointError, match=r"no such checkpoint; saved steps: \[6\]"):
    export_checkpoint.export_checkpoint(workdir, step=3, log=lambda *_: None)
  assert export_checkpoint.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # no run.json


def test_trainable_llama_layers_need_scanned_layers(prepared, tmp_path):
  config = quick_config(prepared)
  with config.unlocked(), config.ignore_type():
    config.scan_layers = False
    config.trainable = [r"llama\.layers\.\d+\.mlp\..*"]  # the listed layers' paths
  synthetic_job.setup(config, str(tmp_path / "w"), log=lambda *_: None)
  with pytest.raises(ConfigError, match=r"trainable LLaMA layer parameters \(llama\.layers\.0\.mlp\..*need scan_layers=True"):
    loop.train(config, str(tmp_path / "w"), log=lambda *_: None)


def test_evaluation_without_a_held_out_split_is_refused_before_training(prepared, tmp_path):
  config = quick_config(prepared)
  synthetic_job.setup(config, str(tmp_path / "w"), log=lambda *_: None)
  with config.unlocked():
    config.eval.every = 2
    config.data.datasets[0]["eval_ann"] = ""
  with pytest.raises(ConfigError, match=r"no dataset has held-out annotations.*--config.eval.every=0"):
    loop.train(config, str(tmp_path / "w"), log=lambda *_: None)
  assert not os.listdir(tmp_path / "w" / "checkpoints")


def test_each_held_out_dataset_gets_eval_batches_and_its_own_loss(prepared, tmp_path):
  config = quick_config(prepared)
  workdir = str(tmp_path / "w")
  synthetic_job.setup(config, workdir, log=lambda *_: None)
  with config.unlocked():
    config.steps, config.eval.every, config.eval.batches = 1, 1, 1
    test = dict(config.data.datasets[0])
    train_split = test | dict(name="train_split", ratio=0.0, eval_ann=test["ann"], eval_media=test["media"])
    config.data.datasets = [test, train_split]  # the second is held out only (ratio 0)
  loop.train(config, workdir, log=lambda *_: None)
  [record] = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))
              if json.loads(line)["split"] == "eval"]
  ours, other = record["loss/synthetic_qa"], record["loss/train_split"]
  assert np.isfinite([ours, other]).all() and ours != other  # one batch of each, not one in all
  assert min(ours, other) < record["loss"] < max(ours, other)  # their token-weighted mean


def test_mfu_counts_the_model_not_the_forward_remat_runs_again(prepared, tmp_path):
  from vllama_jax.data.build import make_loader
  from vllama_jax.pretrained import load_video_llama
  from vllama_jax.sharding import make_mesh
  from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer
  from vllama_jax.train.step import init_train_state, make_train_step
  from vllama_jax.train.trainable import split_trainable
  config = quick_config(prepared)
  synthetic_job.setup(config, str(tmp_path / "w"), log=lambda *_: None)
  mesh, optimizer = make_mesh(tuple(config.mesh)), make_optimizer(OptimizerConfig(**config.optimizer.to_dict()))
  data = make_loader(config, train=True)
  batch = {k: v for k, v in next(data).items() if not k.startswith("_")}
  data.close()
  counts = {}
  for remat in (False, True):
    with config.unlocked():
      config.remat = remat
    model = load_video_llama(config.init_dir, mesh, **loop.model_options(config), remat=remat)
    graphdef, params, frozen = split_trainable(model, loop.trainable_patterns(config))
    step = make_train_step(graphdef, frozen, optimizer, config.mode, mesh)
    state = init_train_state(params, optimizer, 0, mesh)
    mfu_count = loop.model_flops(config, step, graphdef, params, frozen, optimizer, mesh)
    counts[remat] = step.flops(state, batch), mfu_count(state, batch)
  assert counts[False][0] == counts[False][1] == counts[True][1]  # the model's FLOPs either way
  assert counts[True][0] > counts[False][0]  # what the remat step runs: the LLaMA forward once more


def test_sample_answers_answer_questions_and_caption_caption_videos(prepared, tmp_path):
  from vllama_jax.pretrained import load_video_llama
  from vllama_jax.sharding import make_mesh
  from vllama_jax.train.evaluation import sample_answers
  from vllama_jax.train.trainable import split_trainable
  config = quick_config(prepared)
  synthetic_job.setup(config, str(tmp_path / "w"), log=lambda *_: None)
  data = os.path.dirname(os.path.dirname(os.path.dirname(config.data.datasets[0]["eval_ann"])))
  captions = dict(name="captions", format="webvid", ann=os.path.join(data, "annotations", "train"),
                  media=os.path.join(data, "videos"), ratio=0.0,
                  eval_ann=os.path.join(data, "annotations", "test"), eval_media=os.path.join(data, "videos"))
  with config.unlocked():
    config.data.datasets = [captions, dict(config.data.datasets[0])]
    config.eval.generate = 10  # the 8 held-out videos' captions, then 2 questions
  model = load_video_llama(config.init_dir, make_mesh(tuple(config.mesh)), **loop.model_options(config))
  lines = sample_answers(config, *split_trainable(model, loop.trainable_patterns(config)))
  assert len(lines) == 10
  assert all(line.startswith("  caption: ") for line in lines[:8])
  assert all(line.startswith("  Q: ") and "  A: " in line for line in lines[8:])


def test_logged_values_leave_out_skipped_steps_and_add_up_every_batch():
  step = dict(lr=1e-4, grad_norm=1.0)
  window = [step | dict(loss=2.0, skipped=0, tokens=60, flops=10.0),
            step | dict(loss=float("nan"), skipped=1, tokens=500, flops=80.0),
            step | dict(loss=4.0, skipped=0, tokens=60, flops=10.0)]
  values = loop.summarise(window, rows=2, since=time.perf_counter() - 1.0, peak=100.0)
  assert values["loss"] == 3.0 and values["skipped"] == 1 and values["_steps"] == 3
  # every step's own tokens and FLOPs (text buckets differ), not the last batch's times the steps
  np.testing.assert_allclose([values["tokens_per_s"], values["mfu"], values["samples_per_s"]],
                             [620, 1.0, 6], rtol=0.02)
  assert np.isnan(loop.summarise(window[1:2], rows=2, since=time.perf_counter() - 1.0, peak=100.0)["loss"])
