"""The reference schedule, AdamW and its weight-decay mask; trainable counts of the released configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vllama_jax.config import llama_preset
from vllama_jax.convert.audio_branch import al_rules
from vllama_jax.convert.video_branch import vl_rules
from vllama_jax.errors import ConfigError
from vllama_jax.models.audio_branch import AudioBranchConfig
from vllama_jax.models.video_branch import VideoBranchConfig
from vllama_jax.models.video_llama import VideoLLaMA, VideoLlamaConfig
from vllama_jax.sharding import abstract_model
from vllama_jax.train.optimizer import OptimizerConfig, decay_mask, linear_warmup_cosine, make_optimizer
from vllama_jax.train.trainable import count_params, dotted, split_state


def reference_lr(step, init_lr, min_lr, warmup_lr, warmup_steps, iters_per_epoch, max_epoch):
  """LinearWarmupCosineLRScheduler.step(cur_epoch, cur_step), written from the reference's formulas."""
  epoch, cur_step = divmod(step, iters_per_epoch)
  total = epoch * iters_per_epoch + cur_step
  if total < warmup_steps:
    return min(init_lr, warmup_lr + (init_lr - warmup_lr) * cur_step / max(warmup_steps, 1))
  return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * total / (max_epoch * iters_per_epoch))) + min_lr


@pytest.mark.parametrize("args, steps", [
    ((1e-4, 8e-5, 1e-6, 2500, 2500, 5), [0, 1, 1250, 2499, 2500, 2501, 5000, 12499]),  # VL stage 1
    ((3e-5, 1e-5, 1e-6, 400, 1000, 3), [0, 399, 400, 999, 1000, 2999]),  # AL stage 2
    ((1e-3, 1e-4, 1e-5, 150, 100, 3), [0, 50, 99, 100, 120, 149, 150, 299]),  # warm-up across an epoch
])
def test_schedule_matches_reference(args, steps):
  schedule = jax.jit(linear_warmup_cosine(*args))
  ours = [float(schedule(s)) for s in steps]
  ref = [reference_lr(s, *args) for s in steps]
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  warmup_steps, iters_per_epoch = args[3], args[4]
  i = steps.index(warmup_steps)
  if warmup_steps <= iters_per_epoch and steps[i - 1] == warmup_steps - 1:
    assert ours[i] < ours[i - 1]  # the drop when warm-up ends


def test_warmup_restarts_at_epoch_boundary():
  schedule = linear_warmup_cosine(1e-3, 1e-4, 1e-5, 150, 100, 3)
  assert float(schedule(99)) > float(schedule(100)) == pytest.approx(1e-5)


def test_adamw_matches_torch():
  cfg = OptimizerConfig(init_lr=1e-2, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=2, iters_per_epoch=3, max_epoch=2)
  opt = make_optimizer(cfg)
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32),
            "q": rng.normal(size=(1, 2, 4)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
  torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  torch_opt = torch.optim.AdamW([{"params": [torch_params["w"], torch_params["q"]], "weight_decay": 0.05},
                                 {"params": [torch_params["bias"]], "weight_decay": 0.0}],
                                lr=1.0, betas=(0.9, 0.999), eps=1e-8)
  ours, state = jax.tree.map(jnp.asarray, params), opt.tx.init(params)
  for step, g in enumerate(grads):
    lr = float(opt.schedule(step))
    updates, state = opt.tx.update(g, state, ours)
    ours = jax.tree.map(lambda p, u: p - lr * u, ours, updates)
    for group in torch_opt.param_groups:
      group["lr"] = reference_lr(step, 1e-2, 1e-3, 1e-3, 2, 3, 2)
    for k, p in torch_params.items():
      p.grad = torch.tensor(g[k])
    torch_opt.step()
  for k in params:
    np.testing.assert_allclose(np.asarray(ours[k]), torch_params[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def release_state(llm: str):
  hidden = llama_preset(llm).hidden_size
  cfg = VideoLlamaConfig(llama=llama_preset(llm), video=VideoBranchConfig.release(hidden),
                         audio=AudioBranchConfig.release(hidden))
  return cfg, abstract_model(lambda: VideoLLaMA(cfg, rngs=nnx.Rngs(0)))[1]


@pytest.fixture(scope="module")
def release_7b():
  return release_state("llama-7b")


@pytest.mark.parametrize("llm, vl, al", [("llama-7b", 22_104_064, 22_855_680),
                                         ("llama-13b", 22_891_520, 23_643_136)])
def test_release_trainable_counts(llm, vl, al, release_7b):
  _, state = release_7b if llm == "llama-7b" else release_state(llm)
  assert count_params(split_state(state, "vl")[0]) == vl
  assert count_params(split_state(state, "al")[0]) == al
  assert count_params(split_state(state, "joint")[0]) == vl + al


def test_unknown_pattern_is_named(release_7b):
  with pytest.raises(ConfigError, match="video_branch.nothing"):
    split_state(release_7b[1], [r"video_branch\.llama_proj\..*", r"video_branch.nothing"])
  with pytest.raises(ConfigError, match="stage"):
    split_state(release_7b[1], "vl2")


@pytest.mark.parametrize("stage", ["vl", "al"])
def test_decay_mask_matches_reference_rule(stage, release_7b):
  cfg, state = release_7b
  branch, rules = (("video_branch", vl_rules(cfg.video)) if stage == "vl" else
                   ("audio_branch", al_rules(cfg.audio)))
  trainable = split_state(state, stage)[0]
  shapes = {dotted(p): v.shape for p, v in nnx.to_flat_state(trainable)}
  reference = {}
  for name, rule in rules.items():
    (path, _, _), = rule.targets
    ndim = len(shapes[dotted((branch,) + path)])  # a transposed Linear keeps its ndim
    reference[dotted((branch,) + path)] = ndim >= 2 and not any(w in name for w in ("bias", "ln", "bn"))
  assert set(reference) == set(shapes)  # the rules name every trainable tensor once
  ours = {dotted(p): bool(v) for p, v in nnx.to_flat_state(decay_mask(trainable))}
  assert ours == reference
  decayed = {p for p, d in ours.items() if d}
  assert any(p.endswith("query_tokens") for p in decayed)
  assert any(p.endswith("position_embedding") for p in decayed)
