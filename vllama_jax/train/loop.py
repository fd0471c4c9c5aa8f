"""The training loop: converted weights in, a trained converted directory out.

  load the start directory onto the mesh -> split trainable / frozen -> grain data (sharded by
  process) -> jitted steps -> metrics, periodic eval, checkpoints (every N steps, on SIGTERM, at the
  end) -> export

Resuming from `workdir/checkpoints` restores params, optimizer state, step, rng and the data
iterators, so a resumed run continues with exactly the losses an uninterrupted run has.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections import Counter

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vllama_jax import sharding
from vllama_jax.errors import CheckpointError, ConfigError
from vllama_jax.train import checkpoint, metrics
from vllama_jax.train import workdir as run_record
from vllama_jax.train.optimizer import OptimizerConfig, make_optimizer
from vllama_jax.train.step import check_mode, init_train_state, make_eval_step, make_train_step
from vllama_jax.train.trainable import count_params, dotted, resolve, split_trainable


@dataclasses.dataclass
class RunResult:
  step: int
  losses: list[float]  # every step's training loss, this process's run only
  eval_loss: float | None
  export_dir: str | None
  broken: dict  # skipped samples by dataset and reason, summed over processes


class _Stop:
  """Set by SIGTERM (pre-emption): the loop saves a checkpoint and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed on pods and multi-node GPU (arguments from the config or the environment)."""
  d = config.get("distributed")
  if d is None or not d.get("enabled", False) or jax.distributed.is_initialized():
    return
  kwargs = {k: d[k] for k in ("coordinator_address", "num_processes", "process_id") if d.get(k) not in (None, "", -1)}
  jax.distributed.initialize(**kwargs)


def model_options(config) -> dict:
  """The parts of the model a config's mode trains with (`load_video_llama` keywords)."""
  return {"audio": config.mode != "video", "vision_tower": config.mode == "audio_vision",
          "video_options": dict(config.get("video_options", {}))}


def trainable_patterns(config) -> str | tuple[str, ...]:
  return config.trainable if isinstance(config.trainable, str) else tuple(config.trainable)


def model_flops(config, train_step, graphdef, params, frozen, optimizer, mesh):
  """`(state, batch) -> FLOPs` for the MFU: the train step's count, or with `remat` the count of the
  same step without it (MFU counts the model's FLOPs, not the forward that remat runs again)."""
  if not config.get("remat", False):
    return train_step.flops
  from vllama_jax.config import LlamaConfig
  model = nnx.merge(graphdef, params, frozen)  # the same arrays, not copies
  for _, node in nnx.iter_graph(model):
    if isinstance(getattr(node, "config", None), LlamaConfig):
      node.config = dataclasses.replace(node.config, remat=False)
  plain = split_trainable(model, trainable_patterns(config))[0]
  return make_train_step(plain, frozen, optimizer, config.mode, mesh, accum_steps=config.get("accum_steps", 1)).flops


def total_steps(config) -> int:
  o = config.optimizer
  return int(config.get("steps") or o.max_epoch * o.iters_per_epoch)


def global_batch(batch: dict, mesh, stop_requested: bool = False) -> tuple[dict, bool]:
  """This process's rows -> global arrays split over ('data', 'fsdp'), and whether any process was asked
  to stop (SIGTERM reaches the processes of a pod at different moments; all must stop after the same
  step, or the next step's collectives wait on a process that has left)."""
  from vllama_jax.train.step import batch_shardings
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_shardings(batch, mesh)), stop_requested
  batch, stop_requested = _agree_across_processes(batch, stop_requested)
  # Shardings of the global shapes: from a process's rows alone, a global batch that splits over the
  # mesh could look as if it did not, and be taken as replicated (each process's rows a whole copy).
  rows = len(batch["ids"]) * jax.process_count()
  shardings = batch_shardings({k: jax.ShapeDtypeStruct((rows,) + np.shape(v)[1:], np.asarray(v).dtype)
                               for k, v in batch.items()}, mesh)
  if shardings["ids"].spec[0] is None:
    raise ConfigError(f"a global batch of {rows} rows ({len(batch['ids'])} per process) does not split over "
                      f"the mesh's data x fsdp devices {dict(mesh.shape)}; choose batch sizes that do")
  arrays = {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}
  return arrays, stop_requested


TEXT_FILL = {"ids": 0, "source": -1, "labels": -100, "attention_mask": 0}  # as data.pipeline.collate pads


def _agree_across_processes(batch: dict, stop_requested: bool) -> tuple[dict, bool]:
  """One small allgather per step. Each process pads its text to its own batch's bucket; the global
  arrays need one length, the longest of all processes (padding on the right changes no loss). And
  the stop flag of every process, so that all see the same one."""
  from jax.experimental import multihost_utils
  keys = [k for k in TEXT_FILL if k in batch]
  local = max(batch[k].shape[1] for k in keys)
  gathered = np.asarray(multihost_utils.process_allgather(np.array([local, stop_requested], np.int32)))
  longest, stop = int(gathered[:, 0].max()), bool(gathered[:, 1].any())
  return batch | {k: np.pad(batch[k], ((0, 0), (0, longest - batch[k].shape[1])), constant_values=TEXT_FILL[k])
                  for k in keys if batch[k].shape[1] < longest}, stop


def train(config: ml_collections.ConfigDict, workdir: str, *, log=print) -> RunResult:
  """Runs (or resumes) `config` in `workdir`; SIGTERM stops it after the current step with a checkpoint."""
  initialize_distributed(config)
  check_config(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                 every=config.checkpoint.every, asynchronous=config.checkpoint.get("asynchronous", True))
  try:  # closed on every way out: an open manager's threads outlive a failed restore and spew at exit
    return _train(config, workdir, ckpt, log)
  finally:
    ckpt.close()


def _train(config, workdir: str, ckpt: checkpoint.Checkpointer, log) -> RunResult:
  from vllama_jax.data.build import make_loader, read_datasets
  from vllama_jax.pretrained import load_video_llama
  main, multi = jax.process_index() == 0, jax.process_count() > 1
  resuming = ckpt.latest_step is not None
  run = on_process_0(lambda: run_record.begin(workdir, config, resuming), "check the workdir's run record")
  datasets = read_datasets(config, train=True)  # a wrong annotation path fails before the model loads
  if config.eval.every:
    read_datasets(config, train=False)  # and so does a missing held-out split
  mesh = sharding.make_mesh(tuple(config.mesh))
  mode = config.mode
  check_rows(config)
  model = load_video_llama(config.init_dir, mesh, **model_options(config),
                           scan_layers=config.get("scan_layers", True), remat=config.get("remat", False))
  graphdef, params, frozen = split_trainable(model, trainable_patterns(config))
  del model
  listed = [dotted(p) for p, _ in nnx.to_flat_state(params) if dotted(p).startswith("llama.layers.")]
  if listed and not config.get("scan_layers", True):
    raise ConfigError(f"trainable LLaMA layer parameters ({listed[0]}, ...) need scan_layers=True: checkpoints "
                      "and exports hold the layers stacked, as the converted directory does")
  optimizer = make_optimizer(OptimizerConfig(**config.optimizer.to_dict()))
  state = init_train_state(params, optimizer, config.seed, mesh)
  train_step = make_train_step(graphdef, frozen, optimizer, mode, mesh, accum_steps=config.get("accum_steps", 1))
  step_flops = model_flops(config, train_step, graphdef, params, frozen, optimizer, mesh)
  eval_step = make_eval_step(graphdef, frozen, mode, mesh)
  if main:
    log(f"trainable {count_params(params):,} of {count_params(params) + count_params(frozen):,} parameters; "
        f"mesh {dict(mesh.shape)}; {jax.process_count()} process(es)")
    if multi and config.eval.get("generate", 0):
      log("eval.generate is off with several processes (process 0 would generate on arrays that span them "
          "all, alone); ask the export after training")

  data = make_loader(config, train=True, datasets=datasets)
  del datasets
  if resuming:
    state, data_state = ckpt.restore(checkpoint.abstract_like(state))
    data.set_state(data_state)
    if main:
      log(f"resumed from step {int(state.step)} in {ckpt.directory}")
  start = int(state.step)
  total = total_steps(config)
  log_every, eval_every = config.log_every, config.eval.every
  log_file = metrics.MetricsLog(workdir, enabled=main, resume_step=start if resuming else None)
  progress = metrics.Progress(total, start, enabled=main and config.get("progress", True))
  peak = metrics.peak_flops()
  flops_of: dict = {}
  losses, window, eval_loss = [], [], None
  t_last = time.perf_counter()
  try:
    with _Stop() as stop:
      step = start
      while step < total:
        batch, stopping = global_batch(next(data), mesh, stop.requested)
        shape = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if shape not in flops_of:  # per batch shape: text buckets and image / video batches differ
          flops_of[shape] = step_flops(state, batch)
        state, m = train_step(state, batch)
        step += 1
        window.append(m | {"tokens": jnp.sum(batch["attention_mask"]), "flops": flops_of[shape]})
        stop_now = stopping if multi else stop.requested
        if (log_every and step % log_every == 0) or step == total or stop_now:  # a stop logs its part-window
          values = summarise(window, rows=int(batch["ids"].shape[0]), since=t_last, peak=peak)
          losses.extend(float(x["loss"]) for x in window)
          window, t_last = [], time.perf_counter()
          steps_done = values.pop("_steps")
          broken = sum(sum(c.values()) for c in summed_counts(data.counts).values())
          log_file.write(step, "train", values | {"broken": broken})
          progress.update(steps_done, loss=values["loss"], lr=values["lr"],
                          samples_s=values["samples_per_s"], tokens_s=values["tokens_per_s"], mfu=values["mfu"])
        if stop_now:  # pre-emption: the checkpoint first and at once (the step's evaluation is skipped)
          ckpt.save(step, state, data.get_state(), force=True)
          if main:
            progress.write(f"stopped at step {step}; checkpoint saved in {ckpt.directory}")
          return RunResult(step, losses, eval_loss, None, summed_counts(data.counts))
        eval_due = bool(eval_every) and (step % eval_every == 0 or step == total)
        if not (eval_due or ckpt.due(step)):
          continue
        jax.block_until_ready(m)
        paused = time.perf_counter()
        ckpt.save(step, state, data.get_state())  # before the evaluation: a failing one loses no step
        if eval_due:
          eval_loss, by_dataset = evaluate(config, eval_step, state.params, mesh)
          several = len(by_dataset) > 1
          log_file.write(step, "eval", {"loss": eval_loss} | ({f"loss/{k}": v for k, v in by_dataset.items()}
                                                              if several else {}))
          if main:
            progress.write(f"step {step}: held-out loss {eval_loss:.4f}" + (
                " (" + ", ".join(f"{k} {v:.4f}" for k, v in by_dataset.items()) + ")" if several else ""))
          if config.eval.get("generate", 0) and not multi:
            from vllama_jax.train.evaluation import sample_answers
            for line in sample_answers(config, graphdef, state.params, frozen):
              progress.write(line)
        t_last += time.perf_counter() - paused  # throughput counts the train steps only
      ckpt.save(step, state, data.get_state(), force=True)
  finally:
    ckpt.wait()  # the last save is complete before the export
    progress.close()
    log_file.close()
    data.close()
  export_dir = export(config, state.params, workdir, int(state.step), run, log)
  broken = summed_counts(data.counts)
  if main:
    log(f"skipped samples: {broken}")
  return RunResult(int(state.step), losses, eval_loss, export_dir, broken)


def summarise(window, rows: int, since: float, peak: float) -> dict:
  """The logged values of a window of steps' metrics (each with its batch's "tokens" and "flops");
  the loss is the mean over the steps that updated."""
  fetched = jax.device_get(window)  # waits for the window's steps: dispatch runs ahead of them
  seconds = time.perf_counter() - since
  kept = [m["loss"] for m in fetched if not m["skipped"]]  # a skipped step's loss is NaN/Inf, or 0 without targets
  flops = sum(float(m["flops"]) for m in fetched)
  return {
      "loss": float(np.mean(kept)) if kept else float("nan"),
      "lr": float(fetched[-1]["lr"]),
      "grad_norm": float(fetched[-1]["grad_norm"]),
      "skipped": int(sum(int(m["skipped"]) for m in fetched)),
      "samples_per_s": rows * len(fetched) / seconds,
      "tokens_per_s": sum(float(m["tokens"]) for m in fetched) / seconds,
      "mfu": flops / seconds / peak if np.isfinite(flops) else float("nan"),
      "_steps": len(fetched),
  }


def evaluate(config, eval_step, params, mesh) -> tuple[float, dict[str, float]]:
  """Token-mean loss over the held-out split, and per held-out dataset: at most `eval.batches`
  batches of each, the datasets one after the other. Each process reads its own shard, and shards
  may differ by a batch: a dataset ends for every process when one of them has no batch left, so
  that each step has them all. A loss over no token (all broken, or eval.batches=0) is NaN."""
  from vllama_jax.data.build import make_loader
  data = make_loader(config, train=False)
  sums: dict[str, list[float]] = {}
  try:
    for held_out in data.loaders:
      total = sums.setdefault(held_out.name, [0.0, 0.0])
      for _ in range(config.eval.batches):
        batch = next(held_out, None)
        if not _everywhere(batch is not None):
          break
        out = eval_step(params, global_batch(batch, mesh)[0])
        total[0] += float(out["nll_sum"])
        total[1] += float(out["tokens"])
  finally:
    data.close()
  overall = _token_mean(sum(t[0] for t in sums.values()), sum(t[1] for t in sums.values()))
  return overall, {name: _token_mean(*t) for name, t in sums.items()}


def _token_mean(nll: float, tokens: float) -> float:
  return nll / tokens if tokens else float("nan")


def summed_counts(counts: dict) -> dict:
  """{dataset: {reason: n}} of this process's shards -> the same summed over every process."""
  if jax.process_count() == 1:
    return counts
  total: dict[str, Counter] = {}
  for blob in checkpoint.all_processes(json.dumps(counts).encode()):
    for name, reasons in json.loads(blob).items():
      total.setdefault(name, Counter()).update(reasons)
  return {name: dict(reasons) for name, reasons in total.items()}


def _everywhere(flag: bool) -> bool:
  """Whether `flag` holds on every process (one small allgather with several)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).all())


def on_process_0(fn, what: str):
  """fn() on process 0 alone (None elsewhere); an error there is raised on every process, or the
  others would wait for it forever in the next collective."""
  value, error = None, None
  if jax.process_index() == 0:
    try:
      value = fn()
    except Exception as e:  # noqa: BLE001  (re-raised below, after every process has heard)
      error = e
  if not _everywhere(error is None) and error is None:
    raise CheckpointError(f"process 0 could not {what}; see its log")
  if error is not None:
    raise error
  return value


def export(config, params, workdir: str, step: int, run: str | None, log=print) -> str:
  """Writes the trained directory `workdir/export-step<N>` and points the link `workdir/export` at
  it (`export.export_in_workdir`). With several processes, process 0 writes host copies of the
  (gathered) parameters. Returns the link."""
  from jax.experimental import multihost_utils

  from vllama_jax.train import export as exporting
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)  # a collective: every process
  on_process_0(lambda: exporting.export_in_workdir(config.init_dir, params, workdir, step, run, log),
               f"export the trained model to {workdir}")
  return os.path.join(workdir, exporting.EXPORT_LINK)


def check_rows(config) -> None:
  """The media rows each prompt leaves room for (data.num_query_tokens, and 8 audio rows in front in
  the joint mode) are the rows the Q-Formers of `config.init_dir` write: otherwise every prompt would
  splice in rows that do not exist, and every loss would be NaN. Reads the directory's configs only."""
  from vllama_jax.data.build import data_config
  from vllama_jax.pretrained import video_llama_config
  from vllama_jax.train.step import row_runs
  model_config = video_llama_config(config.init_dir, **model_options(config))
  expected, written = data_config(config, train=True).runs, row_runs(model_config, config.mode)
  if written is not None and expected != written:  # (a missing branch: load_video_llama says so)
    raise ConfigError(f"mode {config.mode!r}: the prompts leave room for runs of {expected} media rows "
                      f"(data.num_query_tokens={config.data.num_query_tokens}), but the Q-Formers of the model "
                      f"in {config.init_dir!r} write {written}; set data.num_query_tokens to match")


def check_config(config, workdir: str | None = None) -> None:
  """What can be checked before the model loads (minutes at 7B): paths, mode, trainable set,
  optimizer, data fields and the step intervals (0: off). After `initialize_distributed`: the data
  fields may count local devices."""
  from vllama_jax.data.build import data_config
  for key, path in {"workdir": workdir, "init_dir": config.get("init_dir")}.items():
    if path and "://" in str(path):
      raise ConfigError(f"{key} {path!r}: URLs are not supported; give a local path or a shared "
                        "filesystem mount (NFS, GCS FUSE) that every process sees")
  check_mode(config.mode)
  resolve(trainable_patterns(config))
  try:
    OptimizerConfig(**config.optimizer.to_dict())
  except (TypeError, ConfigError) as e:
    raise ConfigError(f"optimizer: {e}") from None
  data_config(config, train=True)
  off, epochs = " (0: off)", " (0: optimizer.max_epoch x iters_per_epoch)"
  counts = {"steps": (config.get("steps", 0), 0, epochs), "log_every": (config.log_every, 0, off),
            "checkpoint.every": (config.checkpoint.every, 0, off), "eval.every": (config.eval.every, 0, off),
            "checkpoint.keep": (config.checkpoint.keep, 1, ""), "accum_steps": (config.get("accum_steps", 1), 1, "")}
  for key, (value, least, meaning) in counts.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ConfigError(f"{key} must be an integer >= {least}{meaning}, got {value!r}")
