"""The embedded default: a tiny Video-LLaMA learns colour, shape, direction and sound of synthetic videos.

  python train.py --config configs/synthetic.py --workdir /tmp/synthetic
  python train.py --config configs/synthetic.py:no_frame_positions --workdir /tmp/ablation \
      --config.synthetic.data_dir=/tmp/synthetic/data --config.init_dir=/tmp/synthetic/init

Tiny frozen encoders (an EVA-style ViT and image Q-Former on 64-px frames, pretrained on still frames;
a random ImageBind-style audio encoder), a tiny LLaMA pretrained on the dataset's conversations and then
frozen (stage 0, see vllama_jax/train/synthetic_text.py), and both Q-Formers trained jointly on real
audio (not in the paper, which trains the branches one after the other). The variant
`no_frame_positions` switches the frame position embedding off: frame order becomes invisible, so
direction falls to chance while colour and sound do not. `test` / `test_no_frame_positions` are the
same runs without the evaluations along the way, scored on 100 held-out videos; `ci` /
`ci_no_frame_positions` are a shorter pair sized for CI (stage 0 on batches of 16, 400 vision steps of
32 stills, 500 Q-Former steps); both pairs run in tests/test_synthetic_learns.py.
`quick` is a smoke run of a few steps.
"""

import ml_collections

from vllama_jax.errors import ConfigError

VARIANTS = ("", "no_frame_positions", "quick", "test", "test_no_frame_positions", "ci", "ci_no_frame_positions")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ConfigError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = (-1, 1, 1)
  c.mode = "audio_video"
  c.trainable = "joint"
  c.template = "llama_2"
  c.init_dir = ""  # empty: the job builds it in workdir/init
  c.steps = 0  # 0: max_epoch * iters_per_epoch
  c.accum_steps = 1
  c.remat = False
  c.scan_layers = True  # False: the LLaMA's layers as a list (slower compiles; faster bf16 steps on XLA:CPU)
  c.video_options = ml_collections.ConfigDict({"use_frame_positions": not variant.endswith("no_frame_positions")})
  c.synthetic = ml_collections.ConfigDict(dict(
      data_dir="", cache=True, frozen_features=True, num_train=1000, num_test=200, seed=0, vocab_size=512,
      text_steps=400, text_batch_size=32, text_lr=3e-3, slot_noise=0.0,
      vision_steps=500, vision_batch_size=64, vision_lr=1e-3, vision_clips=1000))
  c.model = ml_collections.ConfigDict(dict(
      llm_hidden=128, llm_ffn=344, llm_layers=2, llm_heads=4,
      patch_size=16, vit_width=64, vit_depth=2, image_queries=16, qformer_width=64, audio_width=48))
  c.optimizer = ml_collections.ConfigDict(dict(
      init_lr=1.5e-3, min_lr=5e-4, warmup_lr=1e-5, warmup_steps=50, iters_per_epoch=600, max_epoch=1,
      weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0))
  c.data = ml_collections.ConfigDict(dict(
      datasets=[dict(name="synthetic_qa", format="videochat", ann="", media="", ratio=1.0,
                     eval_ann="", eval_media="")],
      batch_size=16, eval_batch_size=16, num_frames=8, size=64, num_query_tokens=8, max_len=512,
      max_txt_len=32, end_sym="\n", bucket=64, augment=False, cache_dir="", features_dir="", num_workers=0, num_threads=2, prefetch=8))
  c.checkpoint = ml_collections.ConfigDict(dict(every=200, keep=2, asynchronous=True))
  c.eval = ml_collections.ConfigDict(dict(every=300, batches=4, generate=2, batch_size=32, accuracy_limit=0))
  c.log_every = 20
  c.progress = True
  if variant.startswith(("test", "ci")):  # tests/test_synthetic_learns.py: scored on 100 held-out videos
    c.eval.update(every=0, accuracy_limit=100)
    c.progress = False
  if variant.startswith("ci"):
    c.synthetic.update(num_test=100, text_batch_size=16, vision_steps=400, vision_batch_size=32)
    c.optimizer.iters_per_epoch = 500
  if variant == "quick":  # a smoke run for tests: few steps, few samples
    c.synthetic.update(num_train=24, num_test=8, text_steps=8, text_batch_size=8, vision_steps=4,
                       vision_batch_size=8, vision_clips=8)
    c.optimizer.update(iters_per_epoch=8, warmup_steps=2)
    c.data.batch_size = 4
    c.eval.update(every=4, batches=1, generate=0)
    c.checkpoint.every = 4
    c.log_every = 2
  return c
