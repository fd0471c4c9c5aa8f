import glob
import json
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from vllama_jax.train.metrics import MetricsLog


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
