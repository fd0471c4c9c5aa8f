"""The paper's training stages as configs (spec 3.1-3.3; train_configs/*.yaml of the reference).

  stage       trains                      data (ratio)                                   lr init/min/warm-up
  vl_stage1   video Q-Former, frame pos,  WebVid-2M captions (100) + CC595k (24)        1e-4 / 8e-5 / 1e-6
              llama_proj
  vl_stage2   same                        cc_sbu_align, LLaVA-150k, VideoChat-11k        3e-5 / 1e-5 / 1e-6
  al_stage1   audio Q-Former, audio pos,  as vl_stage1, frames through ImageBind vision 1e-4 / 8e-5 / 1e-6
              audio_llama_proj
  al_stage2   same                        as vl_stage2                                   3e-5 / 1e-5 / 1e-6
  joint       both branches, real audio   VideoChat-11k style data with sound (ours)     3e-5 / 1e-5 / 1e-6

Variants name the LLM: vicuna-7b, vicuna-13b (Vicuna v0, "###" template) and llama2-7b, llama2-13b
(LLaMA-2-chat). Paths are left empty: set them with --config.init_dir=... and
--config.data.datasets.<i>.ann=... / .media=... (stage 2 and AL stages start from the previous
stage's `workdir/export`).
"""

from __future__ import annotations

import ml_collections

from vllama_jax.errors import ConfigError

LLMS = {"vicuna-7b": "vicuna", "vicuna-13b": "vicuna", "llama2-7b": "llama_2", "llama2-13b": "llama_2"}
# prompts/alignment_image.txt of the reference, for the caption path of stage 2.
ALIGNMENT_PROMPTS = (
    "<Image><ImageHere></Image> Describe this image in detail.",
    "<Image><ImageHere></Image> Take a look at this image and describe what you notice.",
    "<Image><ImageHere></Image> Please provide a detailed description of the picture.",
    "<Image><ImageHere></Image> Could you describe the contents of this image for me?",
)
# The reference's LLaMA-2 caption template is commented out in its stage-2 YAML, as a single-quoted string
# whose "\n" would stay backslash-n if uncommented (spec 3.2). Ours has real newlines: the header its
# instruction path and the chat template render.
PROMPT_TEMPLATES = {"vicuna": "###Human: {} ###Assistant: ", "llama_2": "[INST] <<SYS>>\n \n<</SYS>>\n\n{} [/INST] "}
END_SYMBOLS = {"vicuna": "###", "llama_2": "</s>"}

STAGES = {
    # name: (trainable, mode, (init, min, warm-up lr), warmup_steps, iters_per_epoch, max_epoch, batch, stage 2?)
    "vl_stage1": ("vl", "video", (1e-4, 8e-5, 1e-6), 2500, 2500, 5, 32, False),
    "vl_stage2": ("vl", "video", (3e-5, 1e-5, 1e-6), 1000, 1000, 3, 4, True),
    "al_stage1": ("al", "audio_vision", (1e-4, 8e-5, 1e-6), 5000, 5000, 5, 32, False),
    "al_stage2": ("al", "audio_vision", (3e-5, 1e-5, 1e-6), 400, 1000, 3, 4, True),
    "joint": ("joint", "audio_video", (3e-5, 1e-5, 1e-6), 400, 1000, 3, 4, True),
}


def _dataset(name, fmt, ratio=1.0):
  return dict(name=name, format=fmt, ann="", media="", ratio=ratio, eval_ann="", eval_media="")


def stage_config(stage: str, variant: str = "vicuna-7b") -> ml_collections.ConfigDict:
  if stage not in STAGES:
    raise ConfigError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
  if variant not in LLMS:
    raise ConfigError(f"unknown LLM variant {variant!r}; expected one of {sorted(LLMS)}")
  trainable, mode, (init_lr, min_lr, warmup_lr), warmup, iters, epochs, batch, second = STAGES[stage]
  template = LLMS[variant]
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  c.mode = mode
  c.trainable = trainable
  c.template = template
  c.init_dir = ""  # converted weights (stage 1) or the previous stage's workdir/export
  c.steps = 0
  c.accum_steps = 1
  c.remat = False
  c.scan_layers = True  # False: the LLaMA's layers as a list (slower compiles; faster bf16 steps on XLA:CPU)
  c.video_options = ml_collections.ConfigDict({"use_frame_positions": True})
  c.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="", num_processes=-1,
                                                 process_id=-1))
  c.optimizer = ml_collections.ConfigDict(dict(
      init_lr=init_lr, min_lr=min_lr, warmup_lr=warmup_lr, warmup_steps=warmup, iters_per_epoch=iters,
      max_epoch=epochs, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, clip_norm=None))
  n_queries = 8 if mode == "audio_vision" else 32
  if second:
    datasets = [_dataset("cc_sbu_align", "image_caption"), _dataset("llava_instruct", "llava"),
                _dataset("webvid_instruct", "videochat")]
    if mode == "audio_video":
      datasets = [_dataset("videochat_with_audio", "videochat")]
    prompts = tuple(PROMPT_TEMPLATES[template].format(p) for p in ALIGNMENT_PROMPTS)
    end_sym, max_txt_len = END_SYMBOLS[template], 320 if stage == "vl_stage2" else 512
  else:
    datasets = [_dataset("webvid", "webvid", 100.0), _dataset("cc595k", "image_caption", 24.0)]
    prompts, end_sym, max_txt_len = (), "\n", 32
  # batch_size_train is per GPU in the reference (8 A100s, one process each): here per local device.
  c.data = ml_collections.ConfigDict(dict(
      datasets=datasets, batch_size=batch, eval_batch_size=batch, batch_per_device=True, num_frames=8, size=224,
      num_query_tokens=n_queries, max_len=512, max_txt_len=max_txt_len, end_sym=end_sym, prompts=prompts,
      bucket=64, augment=True, num_workers=4, num_threads=8, prefetch=8, cache_dir="", features_dir=""))
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, asynchronous=True))
  c.eval = ml_collections.ConfigDict(dict(every=0, batches=50, generate=0, batch_size=8))
  c.log_every = 50
  c.progress = True
  return c
