"""Multi-host for real on one machine: two processes joined by `jax.distributed` over loopback (CPU
collectives over gloo), one CPU device and one data shard each, train the quick synthetic config in
one shared workdir; a single process with two CPU devices (the same mesh), fed the same global
batches (shard 0's rows then shard 1's), gives the same losses, the same final checkpoint and the
same exported parameters. Only process 0 writes the metrics. Pre-emption that reaches one process
only (SIGTERM to process 1 after its first step) stops both after the same step with a checkpoint;
two fresh processes restarted in the same workdir resume every process's data position and continue
with the losses of the uninterrupted run.

The children run tests/multihost_worker.py; the parent prepares the dataset and start directory
once and reads what the children wrote.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from multihost_worker import ODD_EVAL, make_config  # noqa: E402 (tests/ is on sys.path under pytest)
from orbax_trees import assert_trees_close, export_contents, read_tree
from vllama_jax.train import export_checkpoint, synthetic_job

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "multihost_worker.py")
STEPS = 3
SIGTERM_AFTER = 1  # process 1 of the resume test's first run is pre-empted after this step; the
STOPPED_AT = 2  # processes learn of it at the next step's allgather, and both stop after that step
TIMEOUT_S = 420


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax
  except ImportError:  # an older jaxlib layout
    from jax._src.lib import xla_extension as _jax
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(base, devices: int | None) -> dict:
  # The persistent compilation cache lets a restarted process 0 skip compiling the step (only
  # process 0 writes it, and the other processes' keys differ: they compile again).
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"))
  # conftest's eight devices are for this process only; its unoptimised kernels (faster compiles) for all
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  if devices:
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  return env


def _tail(path: str, n: int = 6000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def _run_children(commands: dict[str, tuple[list[str], dict]], logs: str) -> None:
  """Starts every command at once; fails (with each child's output) unless all exit 0 in time."""
  procs = {}
  for name, (args, env) in commands.items():
    log = open(os.path.join(logs, f"{name}.log"), "w")
    procs[name] = (subprocess.Popen([sys.executable, WORKER, *args], env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT), log)
  deadline = time.monotonic() + TIMEOUT_S
  failed = []
  try:
    for name, (proc, _) in procs.items():
      try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        rc = f"timed out after {TIMEOUT_S} s"
      if rc != 0:
        failed.append(f"{name}: {rc}")
  finally:
    for proc, log in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  if failed:
    report = "\n".join(f"===== {name} =====\n{_tail(os.path.join(logs, name + '.log'))}" for name in procs)
    pytest.fail(f"children failed ({'; '.join(failed)}):\n{report}")


def _common(base) -> list[str]:
  return ["--base", str(base), "--steps", str(STEPS), "--dump-after", str(TIMEOUT_S - 20)]


def _two_processes(base, workdir: str, name: str, *extra: str) -> dict:
  """The commands of a two-process job in `workdir`, named `{name}0` and `{name}1`."""
  port = str(_free_port())
  return {f"{name}{i}": (_common(base) + ["--workdir", workdir, "--out", str(base / f"{name}{i}.json"),
                                          "--process-id", str(i), "--port", port, *extra], _env(base, None))
          for i in range(2)}


def _outputs(base, commands) -> dict:
  out = {}
  for name in commands:
    with open(base / f"{name}.json") as f:
      out[name] = json.load(f)
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives (no make_gloo_tcp_collectives)")
  base = tmp_path_factory.mktemp("multihost")
  config = make_config(str(base), STEPS, 4)
  synthetic_job.setup(config, str(base / "setup"), log=lambda *_: None)  # data/ and init/ in base
  with open(base / "data" / "annotations" / "test" / "qa.json") as f:
    held_out = json.load(f)
  with open(base / ODD_EVAL, "w") as f:
    json.dump(held_out[:3], f)
  commands = _two_processes(base, str(base / "multi"), "process")
  commands["baseline"] = (_common(base) + ["--workdir", str(base / "single"), "--out", str(base / "baseline.json"),
                                           "--baseline"], _env(base, 2))
  _run_children(commands, str(base))
  return base, _outputs(base, commands)


@pytest.fixture(scope="module")
def resumed(runs):
  """Two processes, process 1 pre-empted part-way; then two fresh ones with the same command."""
  base, _ = runs
  workdir = str(base / "resumed")
  commands = _two_processes(base, workdir, "stopped")
  commands["stopped1"][0].extend(["--sigterm-after", str(SIGTERM_AFTER)])
  _run_children(commands, str(base))
  stopped = _outputs(base, commands)
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  commands = _two_processes(base, workdir, "restarted")
  _run_children(commands, str(base))
  return base, stopped, checkpoints, _outputs(base, commands)


def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(runs):
  _, out = runs
  for i in range(2):
    o = out[f"process{i}"]
    assert (o["process_index"], o["process_count"], o["device_count"], o["local_device_count"]) == (i, 2, 2, 1)
    assert o["step"] == STEPS and len(o["losses"]) == STEPS
  b = out["baseline"]
  assert (b["process_count"], b["device_count"], b["step"]) == (1, 2, STEPS)
  np.testing.assert_array_equal(out["process0"]["losses"], out["process1"]["losses"])  # one global loss
  # held-out shards of 2 and 1 batches: evaluation ends for both after one, with one loss for both
  assert out["process0"]["eval_loss"] == out["process1"]["eval_loss"] and np.isfinite(out["process0"]["eval_loss"])
  np.testing.assert_allclose(out["process0"]["losses"], b["losses"], rtol=1e-5, atol=0)


def test_only_process_zero_writes_the_metrics(runs):
  base, _ = runs
  lines = [json.loads(line) for line in open(base / "multi" / "metrics.jsonl")]
  # Both processes share the workdir: a second writer would append every step again.
  assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, STEPS + 1))


def _data_states(step_dir) -> list:
  """The data iterator state each process saved, in process order."""
  with open(os.path.join(step_dir, "data", "metadata")) as f:
    return [json.loads(s) for s in json.load(f)["states"]]


def test_the_saved_checkpoint_is_the_single_process_one(runs):
  base, _ = runs
  multi, single = base / "multi" / "checkpoints", base / "single" / "checkpoints"
  assert os.listdir(multi) == os.listdir(single) == [str(STEPS)]
  state = os.path.join(multi, str(STEPS), "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state))  # written by both processes
  a = read_tree(state)
  assert_trees_close(a, read_tree(os.path.join(single, str(STEPS), "state")))
  assert int(a["step"]) == STEPS
  # The data position: process i's iterator where the baseline's shard i is.
  [baseline] = _data_states(os.path.join(single, str(STEPS)))
  assert _data_states(os.path.join(multi, str(STEPS))) == baseline["shards"]


def test_the_export_is_the_single_process_one(runs):
  base, out = runs
  assert out["process0"]["export_dir"] == out["process1"]["export_dir"] == str(base / "multi" / "export")
  multi, multi_links = export_contents(str(base / "multi" / "export"))
  single, single_links = export_contents(str(base / "single" / "export"))
  assert multi and sorted(multi) == sorted(single) and multi_links == single_links
  for name in multi:
    assert_trees_close(multi[name], single[name])
  assert not [n for n in os.listdir(base / "multi") if n.startswith(".converting-")]  # no stray staging


def test_a_pod_checkpoint_exports_on_one_host(runs, tmp_path):
  """The two processes' checkpoint (its data state is per process) exports from this one process."""
  base, _ = runs
  out = export_checkpoint.export_checkpoint(str(base / "multi"), out=str(tmp_path / "one-host"), log=lambda *_: None)
  written, links = export_contents(out)
  trained, trained_links = export_contents(str(base / "multi" / "export"))
  assert sorted(written) == sorted(trained) and links == trained_links
  for name in written:
    assert_trees_close(written[name], trained[name], rtol=0, atol=0)


def test_preempting_one_process_stops_both_and_they_resume_where_they_stopped(runs, resumed):
  _, out = runs
  base, stopped, checkpoints, restarted = resumed
  assert checkpoints == [str(STOPPED_AT)]
  for i in range(2):
    assert stopped[f"stopped{i}"]["step"] == STOPPED_AT and stopped[f"stopped{i}"]["export_dir"] is None
    assert restarted[f"restarted{i}"]["step"] == STEPS
    losses = stopped[f"stopped{i}"]["losses"] + restarted[f"restarted{i}"]["losses"]
    np.testing.assert_allclose(losses, out["process0"]["losses"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(losses, out["baseline"]["losses"], rtol=1e-5, atol=0)
  lines = [json.loads(line) for line in open(base / "resumed" / "metrics.jsonl")]
  assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, STEPS + 1))
  # The end state, data positions included, is the uninterrupted run's.
  resumed_step, multi_step = (os.path.join(base, d, "checkpoints", str(STEPS)) for d in ("resumed", "multi"))
  assert_trees_close(read_tree(os.path.join(resumed_step, "state")), read_tree(os.path.join(multi_step, "state")))
  assert _data_states(resumed_step) == _data_states(multi_step)
