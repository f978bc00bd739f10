"""Lazy public names for a package's __init__: `import minidiff` (or `minidiff.memory`) stays cheap,
and a name's module is imported on first use, so a student can open exactly the file it comes from.

    _PUBLIC = {"DDIMScheduler": "minidiff.schedulers.ddim", ...}   # name -> defining module
    __getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
"""

from __future__ import annotations

import importlib


def lazy_names(package: str, public: dict[str, str]):
    """The module-level `__getattr__` and `__dir__` (PEP 562) that serve `public` from `package`."""
    names = sorted(public)

    def __getattr__(name: str):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(public[name]), name)

    def __dir__():
        return names

    return __getattr__, __dir__
