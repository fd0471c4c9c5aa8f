"""One process of tests/test_multihost.py: the quick synthetic run of `loop.train`, either as one
process of a two-process `jax.distributed` job over loopback (`--process-id`), or as the
single-process baseline (`--baseline`) that feeds the same global batches: the rows of data shard 0
then those of shard 1, the order in which the two processes' rows make up the global batch.

  python tests/multihost_worker.py --base B --workdir W --out OUT.json --steps N \
      (--baseline | --process-id I --port P) [--sigterm-after K]

The environment chooses the devices (JAX_PLATFORMS=cpu; the baseline sets
XLA_FLAGS=--xla_force_host_platform_device_count=2, the two processes one CPU device each).
"""

import argparse
import dataclasses
import json
import os
import sys

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic.py")
GLOBAL_BATCH = 4
ODD_EVAL = "eval_odd.json"  # 3 held-out records (the parent writes it): shards of 2 and 1 batches of 1


def make_config(base: str, steps: int, batch_size: int):
  """The quick synthetic config on the data and start directory the parent prepared in `base`."""
  from vllama_jax.cli import load_config_file
  from vllama_jax.train import synthetic_job
  config = load_config_file(CONFIG + ":quick")
  data_dir = os.path.join(base, "data")
  with config.unlocked():
    config.synthetic.data_dir = data_dir
    config.init_dir = os.path.join(base, "init")
    config.optimizer.iters_per_epoch = steps
    config.eval.every = 0
    config.log_every = 1
    config.progress = False
    config.checkpoint.every = 100  # only the end save
    config.data.batch_size = batch_size
    config.data.features_dir = synthetic_job.features_dir(data_dir, config.init_dir)  # the parent's setup built them
    for spec in config.data.datasets:  # as synthetic_job.setup points them
      spec.update(ann=os.path.join(data_dir, "annotations", "train", "qa.json"),
                  media=os.path.join(data_dir, "videos"),
                  eval_ann=os.path.join(data_dir, "annotations", "test", "qa.json"))
  return config


def evaluate_odd_shards(config, base: str, steps: int) -> None:
  """Held-out loss once, at the end, on ODD_EVAL's 3 records in batches of 1 (2 and 1 per process)."""
  with config.unlocked():
    config.eval.update(every=steps, batches=100)
    config.data.eval_batch_size = 1
    for spec in config.data.datasets:
      spec["eval_ann"] = os.path.join(base, ODD_EVAL)


class ConcatShards:
  """The training Mixer's interface over one Mixer per data shard; each batch is their batches
  stacked row-wise in shard order (what `make_array_from_process_local_data` assembles from the
  processes of a multi-host run)."""

  def __init__(self, mixers):
    self.mixers = mixers

  def __iter__(self):
    return self

  def __next__(self):
    import numpy as np
    batches = [next(m) for m in self.mixers]
    keys = batches[0].keys()
    assert all(b.keys() == keys for b in batches)
    # Each shard pads its text to its own bucket: right-pad to the longest, as collate pads.
    longest = max(b["ids"].shape[1] for b in batches)
    fill = {"ids": 0, "source": -1, "labels": -100, "attention_mask": 0}
    for b in batches:
      for k, value in fill.items():
        if k in b:
          b[k] = np.pad(b[k], ((0, 0), (0, longest - b[k].shape[1])), constant_values=value)
    return {k: np.concatenate([b[k] for b in batches], axis=0) for k in keys}

  @property
  def counts(self):
    return self.mixers[0].counts

  def get_state(self):
    return {"shards": [m.get_state() for m in self.mixers]}

  def set_state(self, state):
    for m, s in zip(self.mixers, state["shards"]):
      m.set_state(s)

  def close(self):
    for m in self.mixers:
      m.close()


def patch_baseline_loader(shards: int) -> None:
  """`make_loader(config, train=True)` -> the shards' loaders (each `batch_size / shards` rows)
  concatenated: the baseline's view of the global batch."""
  from vllama_jax.data import build
  from vllama_jax.data.pipeline import Mixer, loader
  original = build.make_loader

  def make_loader(config, train=True, datasets=None):
    if not train:
      return original(config, train)
    cfg = build.data_config(config, train)
    datasets = build.read_datasets(config, train) if datasets is None else datasets
    ratios = [float(spec.get("ratio", 1.0)) for spec, _ in datasets]
    mixers = []
    for index in range(shards):
      shard_cfg = dataclasses.replace(cfg, shard_index=index, shard_count=shards,
                                      batch_size=cfg.batch_size // shards)
      loaders = [loader(records, config.init_dir, shard_cfg, name=spec.get("name", spec["format"]))
                 for spec, records in datasets]
      mixers.append(Mixer(loaders, ratios, seed=config.seed))
    return ConcatShards(mixers)

  build.make_loader = make_loader


def preempt_after(step: int) -> None:
  """SIGTERM to this process right after it logs `step` (every process calls the metrics writer; only
  process 0's writes)."""
  import signal
  from vllama_jax.train import metrics
  write = metrics.MetricsLog.write

  def write_then_preempt(self, logged, split, values):
    write(self, logged, split, values)
    if split == "train" and logged == step:
      os.kill(os.getpid(), signal.SIGTERM)

  metrics.MetricsLog.write = write_then_preempt


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--base", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--baseline", action="store_true")
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--num-processes", type=int, default=2)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--sigterm-after", type=int, default=None, help="send this process SIGTERM (what a "
                 "pre-empted VM receives) once it has logged this step")
  p.add_argument("--dump-after", type=float, default=0, help="print every thread's stack and exit "
                 "after this many seconds (a hang shows where it waits); 0: never")
  args = p.parse_args(argv)
  if args.dump_after:
    import faulthandler
    faulthandler.dump_traceback_later(args.dump_after, exit=True)

  import jax
  jax.config.update("jax_platforms", "cpu")
  from vllama_jax.torch_compat import install_torchvision_shim
  install_torchvision_shim()
  from vllama_jax.train import loop

  n = args.num_processes
  if args.baseline:
    config = make_config(args.base, args.steps, GLOBAL_BATCH)
    patch_baseline_loader(n)
  else:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    config = make_config(args.base, args.steps, GLOBAL_BATCH // n)
    with config.unlocked():
      config.distributed = dict(enabled=True, coordinator_address=f"127.0.0.1:{args.port}",
                                num_processes=n, process_id=args.process_id)

  evaluate_odd_shards(config, args.base, args.steps)
  if args.sigterm_after is not None:
    preempt_after(args.sigterm_after)
  result = loop.train(config, args.workdir, log=lambda *a: print(*a, file=sys.stderr, flush=True))
  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
         "step": result.step, "losses": result.losses, "export_dir": result.export_dir,
         "eval_loss": result.eval_loss}
  with open(args.out, "w") as f:
    json.dump(out, f)
  if not args.baseline:
    jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
