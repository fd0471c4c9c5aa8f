import glob
import json
import struct
from types import SimpleNamespace

import numpy as np
from tensorboardX.proto import event_pb2

from vllama_jax.train.metrics import MetricsLog, peak_flops, peak_flops_of_kind


def _events(directory):
  """Reads TFRecord-framed Event protos: u64 length, u32 crc, payload, u32 crc."""
  events = []
  for path in sorted(glob.glob(f"{directory}/events.out.tfevents.*")):
    data = open(path, "rb").read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
  log = MetricsLog(str(tmp_path))
  log.write(5, "train", {"loss": np.float32(2.5), "lr": 1e-4, "broken": 0, "note": "x"})
  log.write(10, "eval", {"loss": 1.25, "grad_norm": float("nan")})
  log.close()
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["split"], r["loss"]) for r in lines] == [(5, "train", 2.5), (10, "eval", 1.25)]
  scalars = {(v.tag, e.step): v.simple_value for e in _events(tmp_path / "tensorboard")
             for v in e.summary.value}
  assert scalars == {("train/loss", 5): 2.5, ("train/lr", 5): np.float32(1e-4),
                     ("train/broken", 5): 0.0, ("eval/loss", 10): 1.25}


def test_only_the_logging_process_writes(tmp_path):
  log = MetricsLog(str(tmp_path / "run"), enabled=False)
  log.write(1, "train", {"loss": 1.0})
  log.close()
  assert not (tmp_path / "run").exists()


def _devices(kind, platform, count=1):
  return [SimpleNamespace(device_kind=kind, platform=platform)] * count


def test_peak_flops_by_device_kind():
  assert peak_flops_of_kind("TPU v5") == peak_flops_of_kind("TPU v5p") == 459e12  # what v5p reports
  assert peak_flops_of_kind("TPU v5 lite") == 197e12 and peak_flops_of_kind("TPU v6 lite") == 918e12
  assert peak_flops_of_kind("TPU v3") == 61.5e12  # one TensorCore: half a chip
  assert peak_flops_of_kind("TPU v4 lite") is None  # not v4's figure
  assert peak_flops_of_kind("NVIDIA H100 80GB HBM3") == 989e12  # SXM
  assert peak_flops_of_kind("NVIDIA H100 PCIe") == 756e12 and peak_flops_of_kind("NVIDIA H100 NVL") == 835e12
  assert peak_flops_of_kind("NVIDIA H200") == 989e12 and peak_flops_of_kind("NVIDIA H200 NVL") == 835e12
  assert peak_flops_of_kind("NVIDIA GH200 480GB") == 989e12 and peak_flops_of_kind("NVIDIA A10G") is None
  assert peak_flops_of_kind("NVIDIA A100-SXM4-80GB") == peak_flops_of_kind("NVIDIA A100 80GB PCIe") == 312e12
  assert peak_flops_of_kind("NVIDIA H1000") is None and peak_flops_of_kind("TPU7x") is None
  assert peak_flops(_devices("TPU v5 lite", "tpu", 8)) == 8 * 197e12
  assert np.isnan(peak_flops(_devices("TPU7x", "tpu", 4)))


def test_cpu_peak_is_the_hosts_not_per_forced_device():
  import jax
  assert len(jax.devices()) == 8  # the suite's forced host devices, sharing two cores
  one, all_eight = peak_flops(jax.devices()[:1]), peak_flops()
  assert 0.25 < all_eight / one < 4  # one host's rate either way (timing noise), not 8x
