"""Errors raised for bad user input: each names the file, key or value and what was expected."""


class VllamaError(Exception):
  """Base class for every error this package raises on purpose."""


class ConfigError(VllamaError, ValueError):
  """A config key is unknown, missing or has an impossible value."""


class CheckpointError(VllamaError, ValueError):
  """A checkpoint file is missing, unreadable, or does not match the expected keys and shapes."""


class PromptError(VllamaError, ValueError):
  """A prompt or conversation does not fit its template or its media inputs."""


class NoUsableSample(VllamaError, RuntimeError):
  """Every record of a dataset shard is broken (missing or corrupt media, bad annotations)."""
