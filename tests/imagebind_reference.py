"""The PyTorch ImageBind reference for the parity tests: the `imagebind-unofficial` package (CC-BY-NC),
used only as an installed test dependency; none of its code is copied here.

Import shims (no side effect beyond making these imports work):
* torchvision 0.28.0's wheel is built against CUDA torch; beside the CPU build its meta registrations
  fail with "operator torchvision::nms does not exist" unless the op schemas exist first
  (`vllama_jax.torch_compat.install_torchvision_shim`, which tests/conftest.py also calls).
* `import imagebind` runs `imagebind/__init__.py`, which imports `imagebind.data` (torchaudio,
  pytorchvideo, pkg_resources); a stub module stands in for it where only `imagebind.models` is
  needed, and `imagebind_data` swaps the real one back in for the audio loader's parity tests.
"""

from __future__ import annotations

import importlib
import math
import sys
import types

import numpy as np
import torch

from vllama_jax.torch_compat import install_torchvision_shim

def imagebind_model():
  """The `imagebind.models.imagebind_model` module."""
  install_torchvision_shim()
  if "imagebind" not in sys.modules:
    sys.modules.setdefault("imagebind.data", types.ModuleType("imagebind.data"))
  from imagebind.models import imagebind_model as module
  return module


def imagebind_data():
  """The real `imagebind.data` module, replacing the stub `imagebind_model` may have left."""
  install_torchvision_shim()
  stub = sys.modules.get("imagebind.data")
  if stub is not None and not hasattr(stub, "load_and_transform_audio_data"):
    del sys.modules["imagebind.data"]
  return importlib.import_module("imagebind.data")


SMALL_OTHERS = dict(text_embed_dim=32, text_num_blocks=1, text_num_heads=2, depth_embed_dim=32, depth_num_blocks=1,
                    depth_num_heads=2, thermal_embed_dim=32, thermal_num_blocks=1, thermal_num_heads=2,
                    imu_embed_dim=32, imu_num_blocks=1, imu_num_heads=2)


def reference_model(audio_cfg, vision_cfg, seed=0, audio_logit_scale=None):
  """An ImageBindModel whose audio / vision encoders are shaped like our configs, every parameter random
  (LayerNorms, biases and bias_k / bias_v too), other modalities tiny; eval mode, float32."""
  module = imagebind_model()
  assert audio_cfg.out_dim == vision_cfg.out_dim
  torch.manual_seed(seed)
  model = module.ImageBindModel(
      video_frames=2, kernel_size=(2, vision_cfg.kernel_size, vision_cfg.kernel_size),
      audio_kernel_size=audio_cfg.kernel_size, audio_stride=audio_cfg.stride, out_embed_dim=audio_cfg.out_dim,
      vision_embed_dim=vision_cfg.width, vision_num_blocks=vision_cfg.depth, vision_num_heads=vision_cfg.heads,
      audio_embed_dim=audio_cfg.width, audio_num_blocks=audio_cfg.depth, audio_num_heads=audio_cfg.heads,
      audio_num_mel_bins=audio_cfg.input_size[0], audio_target_len=audio_cfg.input_size[1],
      audio_drop_path=audio_cfg.drop_path, **SMALL_OTHERS).eval()
  assert vision_cfg.input_size == (224, 224)  # ImageBind's vision preprocessor is built for 224
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "modality_postprocessors" in name:
        continue
      if p.ndim == 1 and ("norm" in name or ".0." in name or "pre_transformer" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))  # LayerNorm scales
      elif p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name and "bias_" not in name:
        p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)  # linear and conv weights
      elif p.ndim <= 1:
        p.copy_(0.1 * torch.randn_like(p))  # biases
      else:
        p.copy_(0.5 * torch.randn_like(p))  # cls tokens, position tables, bias_k / bias_v
    if audio_logit_scale is not None:
      model.modality_postprocessors["audio"][1].log_logit_scale.fill_(math.log(audio_logit_scale))
  return model


def state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def reference_features(model, modality: str, x: np.ndarray) -> np.ndarray:
  """ImageBind's per-clip features (N, C, H, W) -> (N, out_dim): preprocessor, trunk, head and
  postprocessor, without the mean over clips that `ImageBindModel.forward` takes."""
  with torch.no_grad():
    value = model.modality_preprocessors[modality](**{modality: torch.tensor(x)})
    out = model.modality_trunks[modality](**value["trunk"])
    out = model.modality_heads[modality](out, **value["head"])
    out = model.modality_postprocessors[modality](out)
  return out.numpy()
