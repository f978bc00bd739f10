"""Sequential offload, the simplest schedule: each module that owns weights visits the accelerator
just for its own forward.

    enable_sequential_cpu_offload(pipe_or_module, device)

Before a module's forward its weights are copied to the device (onload), right after it they are
dropped again (offload). Device memory for weights: the largest layer. Transfers: every weight at
every UNet step, which makes it the slowest schedule and the one that saves the most memory.
Entry points other than forward (vae.encode / vae.decode) need nothing extra: every weight belongs
to a module with its own hook, and those modules run inside encode / decode.

Which modules get their own hook: every module that owns tensors directly (a Linear, a Conv2d, a
GroupNorm), taken with its whole subtree, plus modules whose forward reads a child's weight without
calling the child. CLIP's text embeddings add `position_embedding.weight[:N]` directly, so a hook
on the Embedding module would never fire; such a model class says so with the class attribute
`reads_child_weights_directly = True` (minidiff/models/clip.py), and its module is offloaded as
one unit with its children. `OffloadTracer(check_compute=True)` (tracer.py) proves the coverage:
it fails any operation that reads a weight's CPU home copy instead of a device copy.

The machinery shared with the other schedules: unit.py (what moves), install.py (hooks, removal,
torch.compile). Group offload (group.py) reuses `add_leaf_units` for the modules outside its blocks.

References: diffusers' pipelines/pipeline_utils.py (enable_sequential_cpu_offload), accelerate's
big_modeling.py (cpu_offload) and hooks.py (AlignDevicesHook).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from minidiff.memory.offload.install import (
    OffloadHandle,
    join,
    offload_targets,
    to_device,
)
from minidiff.memory.offload.unit import Unit, has_weights, owns_tensors


def weight_units(module: nn.Module, prefix: str = "", skip: frozenset[int] = frozenset()):
    """Yield (name, module) for the modules that get their own hook: each module that owns tensors
    directly (a Linear, a Conv2d, CLIP's vision embeddings with its class_embedding) or reads its
    children's weights directly, taken with its whole subtree. Subtrees whose root id is in `skip`
    are left out (the blocks of group offloading)."""
    if id(module) in skip:
        return
    if owns_tensors(module) or getattr(module, "reads_child_weights_directly", False):
        if has_weights(module):
            yield prefix, module
        return
    for name, child in module.named_children():
        yield from weight_units(child, join(prefix, name), skip)


@torch.compiler.disable
def _leaf_pre(unit: Unit, module, args, kwargs):
    unit.onload()  # CPU -> device, just for this module's forward
    return to_device(args, kwargs, unit.device)


@torch.compiler.disable
def _leaf_post(unit: Unit, module, args, output):
    unit.offload()  # device copy dropped; the weights are back on the CPU only
    return None


def add_leaf_units(handle: OffloadHandle, prefix: str, module: nn.Module, skip=frozenset()) -> None:
    """One "leaf" unit per module of weight_units(module), hooked on that module."""
    for name, m in weight_units(module, skip=skip):
        unit = handle.add_unit(Unit(join(prefix, name), "leaf", [m], handle.device))
        handle.hook(m, pre=functools.partial(_leaf_pre, unit), post=functools.partial(_leaf_post, unit))


def enable_sequential_cpu_offload(target, device="cuda") -> OffloadHandle:
    """Keep every weight on the CPU; each module that owns weights visits `device` just for its
    own forward. `target`: a pipeline (all its model components) or one nn.Module."""
    components, pipe, device = offload_targets(target, device)
    handle = OffloadHandle("sequential", device)
    with handle.installing(components, pipe):
        for name, comp in components:
            add_leaf_units(handle, name, comp)
    return handle
