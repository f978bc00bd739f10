"""Installing and removing offload hooks: what the three schedules share.

Each enable_* / apply_* call builds one `OffloadHandle`, which owns everything that call put in
place: the units (unit.py), the module hooks, the wrapped methods and the marks. PyTorch module
hooks decide when a unit moves: `register_forward_pre_hook` onloads before a forward,
`register_forward_hook(always_call=True)` offloads after it, also when the forward raises. The
schedule files say which units get which hooks.

    handle.installing(components, pipe)   atomic: if anything fails half-way (tied weights, a
                                          module inside compiled code), what was done is undone
    remove_offload(target)                undo any schedule: the same Parameter objects, with
                                          their values on their original device

Marks. Every offloaded component (and pipeline) carries its handle in the `_minidiff_offload`
attribute. Applying an offload to something that already has one raises a ValueError (a second set
of hooks would take the first one's device copies for home copies); remove_offload on a target
without hooks does nothing.

The pipeline. A pipeline target gets `pipe.execution_device` set to the offload device (and reset
to None on removal): its `device` property reports it, so the sampling loop creates its latents on
the accelerator although the weights live on the CPU between calls. Not supported while
offloading is active: pipe.to(...) and training (device copies are never written back).

torch.compile. The hooks are marked torch.compiler.disable: a compiled module (Module.compile
compiles its hooks too) calls them eagerly instead of tracing their bookkeeping into a graph, and
the compiled code reads the swapped weights as graph inputs, so swapping does not recompile.
minidiff.memory.compile.compile_blocks therefore combines with model and group offload, whose
hooks sit on whole components or blocks (tests/test_compile.py). A hook strictly *inside* an
already compiled module is refused: compiled code never calls it (see `_inside_compiled`).

References: diffusers' hooks/hooks.py (HookRegistry) and pipelines/pipeline_utils.py
(remove_all_hooks); PyTorch docs for Module.register_forward_pre_hook / register_forward_hook.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

from minidiff.errors import InputError
from minidiff.memory.offload.unit import Unit
from minidiff.memory.targets import model_components

# The attribute that marks an offloaded pipeline or module (holds its OffloadHandle).
MARK = "_minidiff_offload"


def join(prefix: str, name: str) -> str:
    """A dotted module name: join("unet", "conv_in") -> "unet.conv_in"; either part may be ""."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def check_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "meta":
        raise InputError("Cannot offload to the 'meta' device: it holds no data, so nothing could compute there. "
                         "Pass the accelerator to compute on, e.g. device='cuda'.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device={str(device)!r} but CUDA is not available on this machine. Pass device='cpu' "
                             "to rehearse the offload schedule without a GPU.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # so tensor.device == device compares true
    elif device.type == "cpu":
        warnings.warn(
            "Offloading to device='cpu': the weights already live on the CPU, so this saves no memory. The hooks "
            "still copy each weight to a fresh tensor for every onload, which rehearses exactly the schedule a GPU "
            "would see (use OffloadTracer to watch it).", UserWarning, stacklevel=4)  # the caller of enable_*
    return device


def offload_targets(target, device) -> tuple[list[tuple[str, nn.Module]], object | None, torch.device]:
    """The checks every schedule starts with: (components, pipeline or None, the checked device).
    Refuses a target that already has offload hooks."""
    device = check_device(device)
    components, pipe = model_components(target)
    handles = [getattr(pipe, MARK, None)] if pipe is not None else []
    handles += [getattr(m, MARK, None) for _, comp in components for m in comp.modules()]
    handle = next((h for h in handles if h is not None), None)
    if handle is not None:
        raise InputError(
            f"This {'pipeline' if pipe is not None else 'module'} already has {handle.mode} offload hooks. "
            "Call remove_offload(...) first: a second set of hooks would take the first one's device "
            "copies for CPU home copies.")
    return components, pipe, device


def to_device(args: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    """Move the tensor arguments of a call to the device (top level only). Lists and dicts are left
    as they are: the UNet's up blocks pop skip connections from a list in place, so the list must
    stay the same object (tensors inside it are produced on the device anyway)."""
    def move(a):
        return a.to(device) if isinstance(a, torch.Tensor) and a.device != device else a
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _inside_compiled(components) -> set[int]:
    """ids of the modules strictly inside a compiled module. Dynamo does not guard on hooks of
    submodules (torch._dynamo.config.skip_nnmodule_hook_guards), so a hook added there after the
    first compiled call would silently never run; hooks on the compiled module itself do run."""
    inside: set[int] = set()
    for _, comp in components:
        for m in comp.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                inside |= {id(sub) for sub in m.modules() if sub is not m}
    return inside


class OffloadHandle:
    """What one enable_* / apply_* call installed. `remove()` (or remove_offload(target)) undoes it."""

    def __init__(self, mode: str, device: torch.device):
        self.mode, self.device = mode, device
        self.units: list[Unit] = []
        self._hooks: list = []  # torch.utils.hooks.RemovableHandle
        self._wrapped: list[tuple[nn.Module, str, object]] = []  # (module, method name, previous __dict__ entry)
        self._marked: list[object] = []
        self._pipe = None
        self._tensor_ids: set[int] = set()
        self._inside_compiled: set[int] = set()

    def add_unit(self, unit: Unit) -> Unit:
        shared = self._tensor_ids & unit.tensor_ids
        if shared:
            unit.restore()
            raise InputError(f"{unit.name!r} shares a weight with another offload unit (tied weights); "
                             "offloading it twice would break the tie. Offload the module that contains both.")
        self._tensor_ids |= unit.tensor_ids
        self.units.append(unit)
        return unit

    def hook(self, module: nn.Module, pre=None, post=None) -> None:
        """`pre(module, args, kwargs)` before the module's forward, `post(module, args, output)`
        after it (also when it raises). Both must be torch.compiler.disable'd."""
        if id(module) in self._inside_compiled:
            raise InputError(
                f"Cannot hook {type(module).__name__}: it sits inside a module that was compiled (Module.compile, "
                "e.g. by compile_blocks), and compiled code does not run hooks added to its submodules. Offload "
                "first and compile after, use model or group offload (their hooks sit on whole blocks), or call "
                "uncompile_blocks(...) first.")
        if pre is not None:
            self._hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            self._hooks.append(module.register_forward_hook(post, always_call=True))

    def wrap_method(self, module: nn.Module, name: str, before) -> None:
        """Make `module.<name>(...)` call `before(args, kwargs)` first (an entry point that is not
        forward, so forward hooks do not see it). The wrapper is an instance attribute that shadows
        the class's method; removing it brings the method back."""
        previous = module.__dict__.get(name)
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            args, kwargs = before(args, kwargs)
            return original(*args, **kwargs)

        object.__setattr__(module, name, wrapper)
        self._wrapped.append((module, name, previous))

    @contextlib.contextmanager
    def installing(self, components, pipe):
        """Install atomically: if anything fails half-way, undo what was done and re-raise; on
        success mark the targets (and tell the pipeline where its loop now runs)."""
        self._inside_compiled = _inside_compiled(components)
        try:
            yield self
        except BaseException:
            self.remove()
            raise
        for _, comp in components:
            setattr(comp, MARK, self)
            self._marked.append(comp)
        if pipe is not None:
            setattr(pipe, MARK, self)
            self._marked.append(pipe)
            pipe.execution_device = self.device  # the pipeline's loop now runs on the device
            self._pipe = pipe

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for module, name, previous in reversed(self._wrapped):
            if previous is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        for unit in self.units:
            unit.restore()
        for obj in self._marked:
            if getattr(obj, MARK, None) is self:
                delattr(obj, MARK)
        if self._pipe is not None:
            self._pipe.execution_device = None  # back to where the weights are
        self._hooks, self._wrapped, self._marked, self.units, self._pipe = [], [], [], [], None


def remove_offload(target) -> None:
    """Remove every offload installed on a pipeline (and its components) or a module: hooks and
    wrappers go, and each weight is back on its original device in the same Parameter object
    (the very same tensor where it started on the CPU; a copy with equal values where it started on
    the accelerator or was pinned). Does nothing when there is nothing to remove."""
    if isinstance(target, OffloadHandle):
        target.remove()
        return
    components, pipe = model_components(target)
    handles = [getattr(pipe, MARK, None)] + [getattr(m, MARK, None) for _, comp in components for m in comp.modules()]
    seen: set[int] = set()
    for h in handles:
        if h is not None and id(h) not in seen:
            seen.add(id(h))
            h.remove()
