"""What a memory function acts on: one nn.Module, or every model component of a pipeline.

The offload schedules (memory/offload/) and the compile helpers (memory/compile.py) all take
`model_or_pipe`; this is the one place that turns it into named modules.
"""

from __future__ import annotations

from torch import nn

from minidiff.errors import InputError


def model_components(target) -> tuple[list[tuple[str, nn.Module]], object | None]:
    """(name, module) for each model of `target`, and the pipeline itself (None for a module).

    A module is returned whole, with the name "". A pipeline (anything with a `.components` dict)
    gives its nn.Module components in its own order (its `__init__` signature); tokenizers and
    schedulers hold no weights and are left out."""
    if isinstance(target, nn.Module):
        return [("", target)], None
    parts = getattr(target, "components", None)
    if parts is None:
        raise InputError(f"Expected a pipeline (with .components) or an nn.Module, got {type(target).__name__}.")
    return [(name, part) for name, part in parts.items() if isinstance(part, nn.Module)], target
