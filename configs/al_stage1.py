"""Video-LLaMA training stage `al_stage1` (see vllama_jax/train/recipes.py); variants: vicuna-7b,
vicuna-13b, llama2-7b, llama2-13b.

  python train.py --config configs/al_stage1.py:llama2-7b --workdir runs/al_stage1 --config.init_dir=... \
      --config.data.datasets.0.ann=... --config.data.datasets.0.media=...
"""

from vllama_jax.train.recipes import stage_config


def get_config(variant: str = "vicuna-7b"):
  return stage_config("al_stage1", variant)
