"""ml_collections config files on the command line: `--config file.py[:variant]` and `--config.a.b=value`.

Overrides may only change keys the file defines: an unknown key is an error naming it and the keys
that do exist, so a typo never silently runs with a default.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import os
from typing import Sequence

import ml_collections

from vllama_jax.errors import ConfigError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/file.py[:variant]` -> the file's `get_config(variant)`, locked against new keys."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_vllama_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  if variant and not inspect.signature(module.get_config).parameters:
    raise ConfigError(f"config file {path!r} has no variants; got {variant!r}")
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except ConfigError as e:
    raise ConfigError(f"config file {path!r}: {e}") from None
  config.lock()
  return config


def positive_int(text: str) -> int:
  """An argparse `type` for counts: an integer >= 1, or a usage error that quotes the text."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
  return value


def _child_key(node, part: str):
  """`part` as a key of `node` (a ConfigDict, dict or list: `datasets.0.ann`), or None."""
  if isinstance(node, list):
    return int(part) if part.isdigit() and int(part) < len(node) else None
  if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
    return part
  return None


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
  *parents, leaf = dotted_key.split(".")
  node, walked = config, "config"
  for part in parents + [leaf]:
    key = _child_key(node, part)
    if key is None:
      known = (list(range(len(node))) if isinstance(node, list) else
               sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else [])
      raise ConfigError(f"unknown config key {dotted_key!r}: {walked} has no {part!r}; known keys: {known}")
    if part != leaf:
      node, walked = node[key], f"{walked}.{part}"
  key = _child_key(node, leaf)
  value = _parse_like(text, node[key], dotted_key)
  if isinstance(node, ml_collections.ConfigDict):
    with node.unlocked(), node.ignore_type():  # ignore_type: a str key given a list (see _parse_like)
      node[key] = value
  else:
    node[key] = value


def _parse_like(text: str, current, key: str):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key!r} expects true/false, got {text!r}")
  if isinstance(current, str):  # a list of strings written as a Python list also fits (`trainable`)
    listed = _literal_or_none(text) if text.lstrip().startswith(("[", "(")) else None
    if isinstance(listed, (list, tuple)) and listed and all(isinstance(x, str) for x in listed):
      return list(listed)
    return text
  if current is None:  # unset: a Python literal ("1.0", "None", "(1, 2)"), else the text itself
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"config key {key!r} expects a {type(current).__name__}, got {text!r}") from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(current)(value)
  if type(value) is not type(current):
    raise ConfigError(f"config key {key!r} expects a {type(current).__name__}, got {text!r}")
  return value


def _literal_or_none(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return None


CONFIG_HELP = ("--config FILE[:variant] (required) names the training config whose datasets are read; "
               "--config.key=value overrides it")


def parse_config_args(argv: Sequence[str], default_spec: str) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Splits `--config ...` and `--config.key=value` arguments from the rest of `argv`."""
  spec, overrides, rest = default_spec, [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg == "--config" or arg.startswith("--config="):
      spec = arg.split("=", 1)[1] if "=" in arg else _value_of(arg, args)
    elif arg.startswith("--config."):
      key, has_value, value = arg[len("--config."):].partition("=")
      overrides.append((key, value if has_value else _value_of(arg, args)))
    else:
      rest.append(arg)
  config = load_config_file(spec)
  for key, value in overrides:
    apply_override(config, key, value)
  return config, rest


def _value_of(flag: str, args: list[str]) -> str:
  if not args:
    raise ConfigError(f"{flag} needs a value")
  return args.pop(0)
