"""Export a saved training checkpoint without training: a run stopped part-way, an earlier step than
its last, or a checkpoint that a pod wrote, exported on one host.

  python -m vllama_jax.train.export_checkpoint --workdir runs/vl1                 # the latest step
  python -m vllama_jax.train.export_checkpoint --workdir runs/vl1 --step 2000 --out vl1-step2000

The settings (start directory, mode, trainable set, optimizer) come from the workdir's run record,
so no config is given. Only the trainable parameters are restored, on this process's first device;
the data iterators' state, which is per process, stays on disk. Without `--out`, the export goes
where the run's own would: `workdir/export-step<N>`, and `workdir/export` follows it unless it holds
a later step of the run.
"""

from __future__ import annotations

import argparse
import os
import sys

from vllama_jax.errors import CheckpointError, VllamaError


def export_checkpoint(workdir: str, step: int | None = None, out: str | None = None,
                      init_dir: str | None = None, copy_frozen: bool = False, log=print) -> str:
  """Exports the checkpoint of `step` (default: the latest) in `workdir`; returns the export's folder."""
  import jax

  from vllama_jax import sharding
  from vllama_jax.pretrained import abstract_video_llama
  from vllama_jax.train import checkpoint, loop
  from vllama_jax.train import export as exporting
  from vllama_jax.train import workdir as run_record
  from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer
  from vllama_jax.train.step import train_state_shapes
  from vllama_jax.train.trainable import split_state

  run, config = run_record.recorded(workdir)
  init_dir = init_dir or config.init_dir
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such directory; this workdir's run saved no checkpoint")
  ckpt = checkpoint.Checkpointer(directory, keep=config.checkpoint.keep, asynchronous=False)  # saves nothing
  try:
    step = ckpt.latest_step if step is None else step
    _, state = abstract_video_llama(init_dir, **loop.model_options(config))
    params, _ = split_state(state, loop.trainable_patterns(config))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    target = train_state_shapes(params, make_optimizer(OptimizerConfig(**config.optimizer.to_dict())), mesh)
    restored, _ = ckpt.restore(target, step, with_data=False)
  finally:
    ckpt.close()
  if out is None:
    return exporting.export_in_workdir(init_dir, restored.params, workdir, step, run, log)
  exporting.export_trained(init_dir, restored.params, out, step=step, run=run, copy_frozen=copy_frozen)
  log(f"exported the trained model of step {step} to {out}")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vllama_jax.train.export_checkpoint",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir (holds run.json and checkpoints/)")
  parser.add_argument("--step", type=int, help="a saved step (default: the latest)")
  parser.add_argument("--out", help="a new directory to export to (default: workdir/export-step<N>)")
  parser.add_argument("--init-dir", help="the converted directory the run started from, if it has moved")
  parser.add_argument("--copy-frozen", action="store_true",
                      help="with --out: copy the frozen weights instead of linking them")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.copy_frozen and not args.out:
    parser.error("--copy-frozen needs --out (exports in the workdir link their frozen weights)")
  try:
    export_checkpoint(args.workdir, args.step, args.out, args.init_dir, args.copy_frozen)
  except VllamaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
