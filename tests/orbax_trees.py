"""Reading what training wrote (orbax checkpoints, exported parameters) back as numpy arrays."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from vllama_jax.pretrained import PARAMS_DIR


def read_tree(path: str):
  """An orbax PyTree checkpoint as numpy arrays, whatever devices wrote it."""
  meta = ocp.PyTreeCheckpointer().metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
    if x.dtype.kind == "f":
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def export_contents(export_dir: str) -> tuple[dict, dict]:
  """({written parameter: arrays}, {linked parameter: link target}) of an exported directory."""
  params = os.path.join(export_dir, PARAMS_DIR)
  names = sorted(os.listdir(params))
  linked = {n: os.readlink(os.path.join(params, n)) for n in names if os.path.islink(os.path.join(params, n))}
  return {n: read_tree(os.path.join(params, n)) for n in names if n not in linked}, linked
