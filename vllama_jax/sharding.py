"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical names in their `out_sharding` metadata (e.g. `('embed', 'mlp')`);
activations are constrained with `constrain(x, names)`. Both resolve through `LOGICAL_RULES`, so the
same model code runs on one CPU and on a pod. A dimension that does not divide evenly over its mesh
axes is replicated instead (e.g. Vicuna's 32001-row vocabulary).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vllama_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "norm": None,
    "queries": None,  # learned query tokens, position tables
    "positions": None,
    "patch": None,  # convolution kernel spatial / input-channel dims
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_length": None,
}


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one entry of `shape` may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ConfigError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh shape {tuple(shape)}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ConfigError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if -1 not in shape and math.prod(shape) < len(devices):
    devices = devices[:math.prod(shape)]  # e.g. (1, 1, 1): the first device
  if math.prod(shape) != len(devices):
    raise ConfigError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                      f"but {len(devices)} are available")
  device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Resolves logical names to a PartitionSpec; with `shape` and `mesh`, uneven dims are replicated."""
  spec, used = [], set()
  for i, name in enumerate(names):
    if name is not None and name not in LOGICAL_RULES:
      raise ConfigError(f"logical axis {name!r} has no entry in LOGICAL_RULES")
    axes = LOGICAL_RULES[name] if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard only one dim
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op when no mesh is set."""
  mesh = _current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedShardings for every variable of an (abstract or concrete) NNX state."""

  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh))

  return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def abstract_with_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
  """ShapeDtypeStructs carrying concrete shardings: the restore target orbax needs."""
  shardings = state_shardings(abstract_state, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))


def abstract_model(build) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs) of the module `build()` returns, allocating nothing.

  Unlike `nnx.eval_shape`, this ignores any mesh in context: our `out_sharding` metadata holds
  logical names, which only `state_shardings` may turn into mesh axes.
  """
  graphdefs = []

  def split():
    graphdef, state = nnx.split(build())
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(split)
  return graphdefs[0], state
