"""`import diffusers` fails, as on a machine without it (the GPU machine has none): put this folder first on
PYTHONPATH (`PYTHONPATH=tools/without_diffusers python -m pytest ...`). .ci/run uses it to show that every test
collects, and the comparisons with diffusers skip saying why, without it."""

import importlib.abc
import sys


class _NoDiffusers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tools/without_diffusers)", name=name)
        return None


sys.meta_path.insert(0, _NoDiffusers())
