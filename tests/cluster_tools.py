"""cluster/ is tooling, not a package: tests load its files by path (once per module name)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def load(name: str):
    """The module cluster/<name>.py (registered under `name`, so its own imports of it share it)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(CLUSTER / f"{name}.py"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
