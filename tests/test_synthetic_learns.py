"""The synthetic job learns what needs frame order and what needs audio, and frame order comes from
the frame position embedding.

`configs/synthetic.py:ci`, a shorter run (stage 0 on batches of 16, 400 vision-tower and 500 Q-Former
steps, 100 held-out videos), answers direction and sound well above chance (25%); its
`ci_no_frame_positions` twin (the same data, stage 0, frozen encoders and steps) leaves direction at
chance while colour and sound do not move. Its vision tower, pre-trained on still frames, tells their
colour and finds their centre. About 8 minutes on 2 idle cores, and a quarter hour on the one core it
takes inside `pytest -n 2 tests`, where it starts first (tests/conftest.py).

And the README's main job reaches its goal: `:test` (the main job without the evaluations along
the way, scored on 100 held-out videos) answers colour, direction and sound at 90% or more, and its
ablation leaves direction at chance. About 11 minutes on 2 idle cores, so only when asked:
  VLLAMA_JAX_LEARNS=1 .venv/bin/python -m pytest tests/test_synthetic_learns.py
Each run is a subprocess on the real single-device CPU backend (the suite's 8 fake devices would halve
its speed).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from vllama_jax.cli import load_config_file
from vllama_jax.data import synthetic
from vllama_jax.train.synthetic_vision import held_out_stills

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir, variant, *overrides):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", f"configs/synthetic.py:{variant}",
         "--workdir", str(workdir), *overrides]
  # Inside the xdist suite the other worker needs the other core: on one core of its own the run spends
  # far less CPU time than two 2-thread XLA processes sharing both.
  pin = (lambda: os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})) if os.environ.get("PYTEST_XDIST_WORKER") else None
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000, preexec_fn=pin)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  accuracy = summary["accuracy"]
  rows = [json.loads(line) for line in open(summary["held_out_answers"])]  # every answer, rescored
  assert len(rows) == 4 * len({r["video"] for r in rows})
  assert all(r["named"] == synthetic.parse_answer(r["answer"], r["attribute"]) for r in rows)
  for attribute, score in accuracy.items():
    right = [r["named"] == r["truth"] for r in rows if r["attribute"] == attribute]
    assert np.mean(right) == pytest.approx(score), attribute
    assert 0.25 <= summary["most_common_value"][attribute] < 0.5
  return accuracy, done.stdout


def stage0_reading(log: str) -> dict[str, float]:
  """The stage-0 LLM's held-out reading of the attribute words from the slots, as the job logs it."""
  [line] = [line for line in log.splitlines() if "read from the slots:" in line]
  return {k: float(v) / 100 for k, v in re.findall(r"(\w+) ([\d.]+)%", line.split(":", 1)[1])}


def stills_scores(log: str) -> dict[str, float]:
  """The vision tower's held-out still-frame scores, as the job logs them."""
  [line] = [line for line in log.splitlines() if "held-out stills:" in line]
  found = re.search(r"colour ([\d.]+)%, shape ([\d.]+)%, centre within ([\d.]+) px", line)
  return {"colour": float(found[1]) / 100, "shape": float(found[2]) / 100, "centre_px": float(found[3])}


def constant_guess_px(variant: str) -> float:
  """The centre error of one constant guess on the stills the job scores its vision tower on."""
  config = load_config_file(os.path.join(ROOT, "configs", f"synthetic.py:{variant}"))
  centres = held_out_stills(config.synthetic.vision_clips, config.seed)[3]
  return float(np.mean(np.abs(centres - centres.mean(0))) * synthetic.SIZE / 2)


def run_pair(tmp_path, variant):
  """(accuracy, log) of `variant`, and the accuracy of its no_frame_positions twin."""
  accuracy, log = train(tmp_path / "run", variant)
  ablation, _ = train(tmp_path / "ablation", f"{variant}_no_frame_positions",
                      f"--config.synthetic.data_dir={tmp_path / 'run' / 'data'}",
                      f"--config.init_dir={tmp_path / 'run' / 'init'}")
  return accuracy, log, ablation


def test_short_run_learns_direction_and_sound_and_direction_needs_frame_positions(tmp_path):
  accuracy, log, ablation = run_pair(tmp_path, "ci")
  stills = stills_scores(log)
  assert stills["colour"] >= 0.9 and stills["centre_px"] < 0.8 * constant_guess_px("ci"), stills
  assert set(stage0_reading(log)) == {"colour", "shape", "direction", "sound"}
  assert accuracy["colour"] >= 0.9 and accuracy["sound"] >= 0.9, accuracy
  assert accuracy["direction"] >= 0.5, accuracy  # twice chance (70% and 89% measured, 50-63% at 400 steps)
  assert ablation["colour"] >= 0.9 and ablation["sound"] >= 0.9, ablation
  assert ablation["direction"] <= 0.36, ablation  # order is what it lacks: chance, within 2.5 sd of 100 videos


@pytest.mark.skipif(os.environ.get("VLLAMA_JAX_LEARNS") != "1",
                    reason="11 minutes of training; set VLLAMA_JAX_LEARNS=1 to run it")
def test_main_job_reaches_its_goal_and_direction_needs_frame_positions(tmp_path):
  accuracy, log, ablation = run_pair(tmp_path, "test")
  reading = stage0_reading(log)
  assert min(reading.values()) >= 0.95, reading
  assert accuracy["colour"] >= 0.9 and accuracy["sound"] >= 0.9, accuracy
  assert accuracy["direction"] >= 0.9, accuracy
  assert ablation["colour"] >= 0.9 and ablation["sound"] >= 0.9, ablation
  assert ablation["direction"] <= 0.4, ablation
