"""Train Video-LLaMA's Q-Formers and projections.

  python train.py --config configs/synthetic.py --workdir /tmp/synthetic          # the embedded default
  python train.py --config configs/vl_stage1.py:vicuna-7b --workdir runs/vl1 \\
      --config.init_dir=converted/video-llama-7b --config.data.datasets.0.ann=webvid/anno ...

Re-running the same command resumes from the last checkpoint in --workdir. On a pod slice or a
multi-node GPU job, run the same command on every host with --config.distributed.enabled=true (see
the README's "Training on pods").
"""

from __future__ import annotations

import json
import os
import sys
import time

from vllama_jax.cli import parse_config_args
from vllama_jax.errors import VllamaError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "synthetic.py")


def run(config, workdir: str, log=print) -> dict:
  """Trains `config` in `workdir`; for the synthetic config also prepares the data and reports
  held-out accuracy per attribute. Returns a summary dict (also written to workdir/summary.json)."""
  import jax

  from vllama_jax.train import loop
  start = time.time()
  plain_log = log
  log = lambda line: plain_log(f"{line}  ({time.time() - start:.0f} s)" if line.startswith("[") else line)  # noqa: E731
  synthetic = "synthetic" in config
  if synthetic:
    from vllama_jax.train import synthetic_job
    data_dir = synthetic_job.setup(config, workdir, log=log)
    log("[4/5] training both Q-Formers")
  result = loop.train(config, workdir, log=log)
  summary = {"step": result.step, "final_loss": result.losses[-1] if result.losses else None,
             "eval_loss": result.eval_loss, "export_dir": result.export_dir, "skipped_samples": result.broken}
  if synthetic and result.export_dir and jax.process_index() == 0:
    log("[5/5] answering every held-out question")
    limit = config.eval.get("accuracy_limit", 0) or None
    answers = os.path.join(workdir, "held_out_answers.jsonl")
    accuracy, most_common = synthetic_job.answer_held_out(config, result.export_dir, data_dir, limit=limit,
                                                          answers_path=answers, log=log)
    summary.update(accuracy=accuracy, most_common_value=most_common, held_out_answers=answers)
    log("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    log("  (the most common value's share, to beat: "
        + ", ".join(f"{k} {v:.1%}" for k, v in most_common.items()) + f"; every answer in {answers})")
  summary["seconds"] = round(time.time() - start, 1)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    config, rest = parse_config_args(argv, DEFAULT_CONFIG)
    if rest[:1] == ["--workdir"] and len(rest) == 2:
      workdir = rest[1]
    elif len(rest) == 1 and rest[0].startswith("--workdir="):
      workdir = rest[0].split("=", 1)[1]
    else:
      print(f"usage: train.py --config FILE[:variant] --workdir DIR [--config.key=value ...]; got {rest}",
            file=sys.stderr)
      return 2
    run(config, workdir)
  except VllamaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
