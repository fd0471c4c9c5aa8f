"""notebooks/video_llama_chat.ipynb runs top to bottom as a plain script (no Jupyter needed)."""

import json
import os
import subprocess
import sys

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "video_llama_chat.ipynb")

# Executes every code cell in order in one namespace, as a kernel would.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for i, cell in enumerate(json.load(open(sys.argv[1]))["cells"]):
  if cell["cell_type"] == "code":
    print(f"--- cell {i} ---", flush=True)
    exec(compile("".join(cell["source"]), f"<cell {i}>", "exec"), namespace)
"""


def test_notebook_is_clean():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_notebook_runs(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env |= {"JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path)}  # the notebook's scratch dir goes in tmp_path
  proc = subprocess.run([sys.executable, "-c", RUNNER, NOTEBOOK], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  out = proc.stdout
  assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
  assert "mode: audio_video" in out
  assert "time hint: The video contains 8 frames sampled at 0.0, 0.4, " in out
  assert "frames: (8, 224, 224, 3) float32" in out
  assert "<PIL.Image.Image image mode=RGB size=924x112" in out  # the contact sheet
  assert "Q: What colour is the square?" in out
  before, after = out.split("before/after the second call:")[1].split("\n")[0].split()
  assert int(before) == int(after) > 0
  assert "same answers (greedy): True" in out
