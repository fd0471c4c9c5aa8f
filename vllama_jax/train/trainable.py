"""Which parameters train: regexes over dotted parameter paths, with one preset per paper stage.

A path is the parameter's place in `VideoLLaMA`, its parts joined by dots, e.g.
`video_branch.video_qformer.layers.0.attention.query.kernel`. A parameter trains when some
pattern matches its whole path (`re.fullmatch`); everything else, the LLM included, is frozen.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

from flax import nnx

from vllama_jax.errors import ConfigError

VL = (r"video_branch\.(video_qformer|frame_position_embedding|llama_proj)(\..*)?",)
AL = (r"audio_branch\.(audio_qformer|audio_position_embedding|audio_llama_proj)(\..*)?",)
# The paper trains VL then AL, never both at once (spec 3.1); "joint" is our own option.
STAGES: dict[str, tuple[str, ...]] = {"vl": VL, "al": AL, "joint": VL + AL}


def dotted(path: Sequence) -> str:
  return ".".join(str(p) for p in path)


def resolve(patterns: str | Sequence[str]) -> tuple[str, ...]:
  """A stage name ("vl", "al", "joint") or a list of regexes -> the regexes."""
  if isinstance(patterns, str):
    if patterns not in STAGES:
      raise ConfigError(f"unknown trainable stage {patterns!r}; expected one of {sorted(STAGES)} "
                        "or a list of regexes")
    return STAGES[patterns]
  patterns = tuple(patterns)
  if not patterns:
    raise ConfigError("the trainable patterns are empty: nothing would train")
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ConfigError(f"trainable pattern {p!r} is not a valid regex ({e})") from None
  return patterns


def trainable_filter(patterns: str | Sequence[str]) -> Callable[[tuple, object], bool]:
  """An nnx filter: True for the `nnx.Param`s whose dotted path some pattern matches."""
  compiled = [re.compile(p) for p in resolve(patterns)]
  return lambda path, value: (isinstance(value, nnx.Param)
                              and any(c.fullmatch(dotted(path)) for c in compiled))


def split_state(state: nnx.State, patterns: str | Sequence[str]) -> tuple[nnx.State, nnx.State]:
  """(trainable, frozen) parts of a model state (concrete or abstract). A pattern that matches no
  parameter is a ConfigError naming it."""
  patterns = resolve(patterns)
  paths = [dotted(p) for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)]
  unused = [p for p in patterns if not any(re.fullmatch(p, path) for path in paths)]
  if unused:
    raise ConfigError(f"trainable pattern(s) {unused} match no parameter of the model")
  return nnx.split_state(state, trainable_filter(patterns), ...)


def split_trainable(model: nnx.Module, patterns: str | Sequence[str]):
  """(graphdef, trainable State, frozen State); `nnx.merge(graphdef, trainable, frozen)` rebuilds it."""
  graphdef, state = nnx.split(model)
  return (graphdef, *split_state(state, patterns))


def count_params(state: nnx.State) -> int:
  """Number of scalars in a (concrete or abstract) state."""
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))
