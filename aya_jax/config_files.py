"""Load an ml_collections config file by path, as `--config=path[:arg]` does.

Configs that build on a sibling config (demo -> pipeline, 32B -> 8B), the tests, and the CLI's
error hints all load config files by path. This module has no absl flags of its own, so a
config file can import it (importing `aya_jax.main` from a config would define the flags twice).
"""

from __future__ import annotations

import importlib.util
import os


def _exists(path: str) -> str:
  """`path` when it is a file; FileNotFoundError naming it (as given and
  absolute) otherwise."""
  if not os.path.isfile(path):
    where = "" if os.path.abspath(path) == path else f" (looked for {os.path.abspath(path)})"
    raise FileNotFoundError(f"config file {path} does not exist{where}")
  return path


def check_file(spec: str) -> str:
  """The file of `spec` (`file.py` or `file.py:arg`, as `--config=` takes);
  FileNotFoundError naming it when there is no such file."""
  return _exists(spec.rsplit(":", 1)[0] if ":" in os.path.basename(spec) else spec)


def load_module(path: str):
  """The config file at `path` as a fresh module."""
  path = os.path.abspath(_exists(path))
  name = "aya_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(path: str, arg: str | None = None):
  """`get_config(arg)` of the file at `path`; `path` may be `file.py:arg` as on the command line."""
  if arg is None and ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  module = load_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def sibling(config_file: str, name: str, arg: str | None = None):
  """The config `name` in the same directory as `config_file` (a config's own `__file__`)."""
  return get_config(os.path.join(os.path.dirname(os.path.abspath(config_file)), name), arg)
