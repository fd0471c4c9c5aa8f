"""Makes the PyTorch reference packages (transformers models, timm, ImageBind) importable beside a
CPU build of torch. Used by the tests and benchmarks; the package itself never needs it.

PyPI's torchvision wheels are built against CUDA torch. Beside the CPU build, their Python side
registers fake kernels for `torchvision::nms` / `qnms`, whose schemas the C++ library (which cannot
load) would have defined: defining the two schemas first lets torchvision import, and transformers
imports torchvision as soon as a model class is imported. pytorchvideo 0.1.5 also imports a
torchvision module that has since been renamed.
"""

from __future__ import annotations

import importlib.metadata
import sys

_LIBRARIES = []  # a torch.library.Library's definitions live as long as the object


def install_torchvision_shim() -> None:
  """Idempotent; does nothing without torchvision, with a CPU torchvision, or once it is imported."""
  import torch
  if "+cpu" not in torch.__version__ or "torchvision" in sys.modules:
    return
  try:
    torchvision_version = importlib.metadata.version("torchvision")
  except importlib.metadata.PackageNotFoundError:
    return
  if "+cpu" in torchvision_version:  # a CPU torchvision registers its own ops
    return
  try:
    torch.ops.torchvision.nms  # noqa: B018 -- already defined
  except (AttributeError, RuntimeError):
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(lib)
  import torchvision.transforms._functional_tensor as functional_tensor
  sys.modules.setdefault("torchvision.transforms.functional_tensor", functional_tensor)
