"""CPU offloading: the weights live in CPU memory and visit the accelerator only to compute.

Three schedules (diffusers' names), from least to most device memory saved:

    enable_model_cpu_offload(pipe, device)
        Whole components in pipeline order, text_encoder -> unet -> vae. A component moves to the
        device when it is called (forward, or the VAE's encode / decode) and the one before it
        goes back. Device memory for weights: the largest component. Transfers: each component
        once per image; the UNet stays for all its steps.
    apply_group_offloading(module_or_pipe, device, num_blocks_per_group, use_stream=False)
        Groups of consecutive blocks (the UNet's down / mid / up blocks, the VAE's, CLIP's encoder
        layers) move together for their forward; the small modules outside the blocks (conv_in,
        embeddings, norms) move one by one as in sequential offload. use_stream=True on CUDA:
        the next group is copied from pinned CPU memory on a side stream while the current one
        computes (prefetch), so at most two groups are on the device.
    enable_sequential_cpu_offload(pipe_or_module, device)
        Every module that owns weights moves to the device for its own forward and leaves right
        after. Device memory: the largest layer. Transfers: every weight at every UNet step (slow).
    remove_offload(target)
        Undo any of them: the same Parameter objects, with their values on their original device.

How it works. One piece, `_Unit`, is a set of tensors (parameters and buffers of some modules)
that travel together. At install each tensor gets a CPU "home copy" (the original tensor itself
when it is already on the CPU; pinned when streaming). Onload sets `param.data` to a fresh copy on
the device; offload points `param.data` back at the home copy, which frees the device copy
(inference only: weights are never written, so nothing is copied back). The Parameter objects
never change, so optimisers, state_dict() and weight tying by object keep working. PyTorch module
hooks decide when: `register_forward_pre_hook` onloads before a forward, `register_forward_hook`
(always_call=True, so also after an exception) offloads after it. The hooks are marked
torch.compiler.disable: a compiled module (Module.compile compiles its hooks too) calls them
eagerly instead of tracing their bookkeeping into a graph. Entry points that are not
`forward` (AutoencoderKL.encode / decode) are wrapped for model offload and are covered by the
per-module hooks in the two other modes.

Which modules get their own hook in sequential mode: every module that owns tensors directly,
taken with its whole subtree, plus modules whose forward reads a child's weight without calling
the child (`_READS_CHILD_WEIGHTS`: CLIP's embeddings add `position_embedding.weight[:N]` directly,
so a hook on the Embedding module would never fire). `OffloadTracer(check_compute=True)` proves
the coverage: it fails any operation that reads a weight's CPU home copy instead of a device copy.

Testing without a GPU. Passing device="cpu" runs the real schedule as a rehearsal: every onload
still allocates a fresh tensor and copies into it, every offload drops it, so OffloadTracer sees
exactly the moves a GPU would see and the compute check can tell home copies from device copies;
it only saves no memory (a warning says so). With use_stream=True on the CPU the prefetch
schedule runs with synchronous copies (there is no copy engine to overlap with).

Weights that already live on the accelerator are first moved to their CPU home (as diffusers
does), so `pipe.to("cuda")` before offloading is harmless but pointless; remove_offload moves them
back. Applying an offload to something that already has one raises a ValueError (a second set of
hooks would treat the first one's device copies as home copies); remove_offload on a target
without hooks does nothing. A pipeline target also gets `pipe._offload_device`, which its
`device` property reports, so the sampling loop creates its latents on the accelerator. Not
supported while offloading is active: pipe.to(...), training (device copies are never written
back). torch.compile: minidiff.memory.compile.compile_blocks combines with model and group offload
(tests/test_compile.py); hooks that would sit strictly inside an already compiled module are
refused with a ValueError, because compiled code never calls them (see `_inside_compiled`).

References: diffusers' pipelines/pipeline_utils.py (enable_model_cpu_offload,
enable_sequential_cpu_offload) and hooks/group_offloading.py; accelerate's hooks.py
(AlignDevicesHook, cpu_offload_with_hook); PyTorch docs for Module.register_forward_pre_hook,
Tensor.record_stream and CUDA streams / pinned memory.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minidiff.errors import InputError
from minidiff.models.clip import CLIPTextEmbeddings, CLIPVisionEmbeddings

# Pipeline components in the order a text-to-image call uses them (model offload moves them in
# this order); components not named here come after, in the pipeline's order.
PIPELINE_ORDER = ("text_encoder", "image_encoder", "prior", "unet", "vae")

# Modules whose forward reads a child module's weight directly (not through the child's forward),
# so the child's own hook would never fire: they are offloaded as one unit with their children.
_READS_CHILD_WEIGHTS: tuple[type, ...] = (CLIPTextEmbeddings, CLIPVisionEmbeddings)

# The attribute that marks an offloaded pipeline or module (holds its OffloadHandle).
_MARK = "_minidiff_offload"

# ------------------------------------------------------------------------------------------------
# Global bookkeeping shared by the hooks and the tracer

_TRACERS: list["OffloadTracer"] = []
_RESIDENT: dict[int, "_Unit"] = {}  # id(unit) -> unit, for every unit whose weights are on the device
_HOME_STORAGES: dict[int, str] = {}  # data_ptr of each CPU home copy's storage -> unit name
_in_transfer = 0  # > 0 while a hook copies weights (the compute check must not flag those reads)


@contextlib.contextmanager
def _transferring():
    global _in_transfer
    _in_transfer += 1
    try:
        yield
    finally:
        _in_transfer -= 1


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return 0


# ------------------------------------------------------------------------------------------------
# The unit of transfer


class _Unit:
    """The parameters and buffers of some modules, moved between CPU home copies and the device
    together. `kind` is "component", "group" or "leaf" (for the tracer)."""

    def __init__(self, name: str, kind: str, modules: list[nn.Module], device: torch.device, pin: bool = False):
        self.name, self.kind, self.device = name, kind, device
        self.resident = False
        self.ready: torch.cuda.Event | None = None  # set while a prefetch copy may still be running
        # A slot is (module, attribute name, is_parameter): where one tensor is plugged in.
        self.slots: list[tuple[nn.Module, str, bool]] = []
        seen: set[int] = set()
        for root in modules:
            for m in root.modules():
                for key, p in m._parameters.items():
                    if p is not None and id(p) not in seen:
                        seen.add(id(p))
                        self.slots.append((m, key, True))
                for key, b in m._buffers.items():
                    if b is not None and id(b) not in seen:
                        seen.add(id(b))
                        self.slots.append((m, key, False))
        self.tensor_ids = seen  # ids of the Parameter / buffer objects (to refuse shared weights)

        # Home copies on the CPU. A CPU tensor is its own home copy (no extra memory), unless the
        # stream path needs page-locked memory for asynchronous copies; a device tensor is copied
        # to the CPU now, and its device memory is released when the slot points at the home copy.
        self.homes: list[torch.Tensor] = []
        self.originals: list[torch.Tensor | None] = []  # kept only where it *is* the home copy
        self.original_devices: list[torch.device] = []
        with _transferring():
            for slot in self.slots:
                t = self._get(slot)
                home = t if t.device.type == "cpu" else t.to("cpu")  # device -> CPU (one time)
                if pin and not home.is_pinned():
                    home = home.pin_memory()  # CPU -> page-locked CPU: lets the GPU copy asynchronously
                self.originals.append(t if home is t else None)
                self.original_devices.append(t.device)
                self.homes.append(home)
                self._set(slot, home)  # the slot holds the home copy until the first onload
        for home in self.homes:
            if _storage_ptr(home):
                _HOME_STORAGES[_storage_ptr(home)] = self.name
        self.nbytes = sum(h.numel() * h.element_size() for h in self.homes)

    @staticmethod
    def _get(slot) -> torch.Tensor:
        module, key, is_param = slot
        return module._parameters[key].data if is_param else module._buffers[key]

    @staticmethod
    def _set(slot, tensor: torch.Tensor) -> None:
        module, key, is_param = slot
        if is_param:
            module._parameters[key].data = tensor  # same Parameter object, new storage
        else:
            module._buffers[key] = tensor

    def onload(self, stream: torch.cuda.Stream | None = None, prefetch: bool = False) -> None:
        """Copy every tensor to the device; on `stream` when given (a CUDA prefetch). `prefetch`
        only labels the event for the tracer (the CPU rehearsal prefetches without a stream)."""
        if self.resident:
            return
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with _transferring(), ctx:
            for slot, home in zip(self.slots, self.homes):
                # CPU home copy -> a new tensor on the device. copy=True makes a new tensor even when
                # the device is the CPU (rehearsal), so device copies and home copies never alias.
                self._set(slot, home.to(self.device, copy=True, non_blocking=home.is_pinned()))
            if stream is not None:
                self.ready = torch.cuda.Event()
                self.ready.record(stream)  # marks the end of this group's copies on the side stream
        self.resident = True
        _RESIDENT[id(self)] = self
        _emit("prefetch" if prefetch else "onload", self)

    def wait_ready(self) -> None:
        """Before computing with a prefetched unit: the compute stream waits (on the GPU, the host
        does not block) for the side-stream copies, and the device copies are marked as used by the
        compute stream, so the caching allocator does not hand their memory to the next prefetch
        while kernels still read it."""
        if self.ready is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.ready)
        for slot in self.slots:
            self._get(slot).record_stream(compute)
        self.ready = None

    def offload(self) -> None:
        """Point every slot back at its CPU home copy; the device copy is freed (nothing to copy
        back: inference never writes weights)."""
        if not self.resident:
            return
        for slot, home in zip(self.slots, self.homes):
            self._set(slot, home)  # device copy dropped here
        self.resident, self.ready = False, None
        _RESIDENT.pop(id(self), None)
        _emit("offload", self)

    def restore(self) -> None:
        """Put every tensor back where it was before offloading (remove_offload)."""
        self.offload()
        with _transferring():
            for slot, home, original, device in zip(self.slots, self.homes, self.originals, self.original_devices):
                # The original tensor where we kept it (it was the CPU home copy); else CPU -> its device.
                self._set(slot, original if original is not None else home.to(device))
        for home in self.homes:
            _HOME_STORAGES.pop(_storage_ptr(home), None)


# ------------------------------------------------------------------------------------------------
# Instrumentation


@dataclass(frozen=True)
class OffloadEvent:
    index: int  # position in the tracer's log
    action: str  # "onload", "prefetch" (onload on a side stream) or "offload"
    kind: str  # "component", "group" or "leaf"
    name: str  # e.g. "unet", "unet.down_blocks[0-1]", "unet.down_blocks.0.resnets.0.conv1"
    device: str  # where the unit's weights are after the event
    nbytes: int  # size of the unit's weights


def _emit(action: str, unit: _Unit) -> None:
    for tracer in _TRACERS:
        tracer._record(action, unit)


class _ComputeCheck(TorchDispatchMode):
    """Fails any operation (other than an offload hook's own copy) that reads a weight's CPU home
    copy: that weight computed without having been onloaded, i.e. a hook is missing."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _in_transfer:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    owner = _HOME_STORAGES.get(_storage_ptr(t))
                    if owner is not None:
                        raise RuntimeError(
                            f"{func} read the CPU home copy of a weight of {owner!r} instead of a copy on "
                            "the device: that weight was not onloaded before it computed, so an offload "
                            "hook is missing (e.g. a parent module reads a child's .weight directly).")
        return func(*args, **kwargs)


class OffloadTracer:
    """Records every move the offload hooks make while active.

        with OffloadTracer(check_compute=True) as tracer:
            pipe("a red circle", num_inference_steps=2)
        tracer.max_resident("component")   # 1 with model offload
        print(tracer.summary())

    events            list of OffloadEvent (onload / prefetch / offload, kind, name, device, bytes)
    timeline()        [(event, names of the units on the device right after it)], for plots
    max_resident(k)   the largest number of units of kind k on the device at one moment
    peak_bytes(k)     the largest total size of weights of kind k on the device at one moment
                      (with no kind: all kinds together; the weight memory an accelerator would hold)
    check_compute     also fail any op that computes with a weight that is not on the device
                      (a TorchDispatchMode: slow, test-only, and it makes torch.compile'd code
                      fall back to eager while active)
    """

    def __init__(self, check_compute: bool = False):
        self.check_compute = check_compute
        self.events: list[OffloadEvent] = []
        self._after: list[tuple[str, ...]] = []  # resident unit names after each event
        self._mode: _ComputeCheck | None = None

    def __enter__(self) -> "OffloadTracer":
        self.events, self._after = [], []
        self._resident = {uid: u for uid, u in _RESIDENT.items()}  # what was on the device already
        self._max_count: dict[str | None, int] = {}
        self._max_bytes: dict[str | None, int] = {}
        self._update_peaks()
        _TRACERS.append(self)
        if self.check_compute:
            self._mode = _ComputeCheck()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        _TRACERS.remove(self)

    def _record(self, action: str, unit: _Unit) -> None:
        where = unit.device if action != "offload" else torch.device("cpu")
        self.events.append(OffloadEvent(len(self.events), action, unit.kind, unit.name, str(where), unit.nbytes))
        if action == "offload":
            self._resident.pop(id(unit), None)
        else:
            self._resident[id(unit)] = unit
        self._after.append(tuple(u.name for u in self._resident.values()))
        self._update_peaks()

    def _update_peaks(self) -> None:
        units = list(self._resident.values())
        for kind in {None, *(u.kind for u in units)}:
            mine = [u for u in units if kind is None or u.kind == kind]
            self._max_count[kind] = max(self._max_count.get(kind, 0), len(mine))
            self._max_bytes[kind] = max(self._max_bytes.get(kind, 0), sum(u.nbytes for u in mine))

    def timeline(self) -> list[tuple[OffloadEvent, tuple[str, ...]]]:
        return list(zip(self.events, self._after))

    def max_resident(self, kind: str | None = None) -> int:
        return self._max_count.get(kind, 0)

    def peak_bytes(self, kind: str | None = None) -> int:
        return self._max_bytes.get(kind, 0)

    def resident(self, kind: str | None = None) -> list[str]:
        """Names of the units on the device now."""
        return [u.name for u in self._resident.values() if kind is None or u.kind == kind]

    def count(self, action: str, kind: str | None = None) -> int:
        return sum(e.action == action and (kind is None or e.kind == kind) for e in self.events)

    def bytes_moved(self, kind: str | None = None) -> int:
        """Bytes copied host -> device (onloads and prefetches)."""
        return sum(e.nbytes for e in self.events if e.action != "offload" and (kind is None or e.kind == kind))

    def summary(self) -> str:
        kinds = sorted({e.kind for e in self.events})
        lines = [f"{len(self.events)} events"]
        for k in kinds:
            lines.append(f"  {k}: {self.count('onload', k)} onloads, {self.count('prefetch', k)} prefetches, "
                         f"{self.bytes_moved(k) / 2**20:.2f} MiB moved, at most {self.max_resident(k)} resident "
                         f"({self.peak_bytes(k) / 2**20:.2f} MiB)")
        lines.append(f"  peak weights on the device: {self.peak_bytes() / 2**20:.2f} MiB")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Helpers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _owns_tensors(module: nn.Module) -> bool:
    return (any(p is not None for p in module._parameters.values())
            or any(b is not None for b in module._buffers.values()))


def _check_device(device) -> torch.device:
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
            "would see (use OffloadTracer to watch it).", UserWarning, stacklevel=3)
    return device


def _components(target) -> tuple[list[tuple[str, nn.Module]], object | None]:
    """(name, module) pairs to offload, and the pipeline (None when target is a module)."""
    if isinstance(target, nn.Module):
        return [("", target)], None
    parts = getattr(target, "components", None)
    if parts is None:
        raise InputError(f"Expected a pipeline (with .components) or an nn.Module, got {type(target).__name__}.")
    modules = {k: v for k, v in parts.items() if isinstance(v, nn.Module)}
    order = [k for k in PIPELINE_ORDER if k in modules] + [k for k in modules if k not in PIPELINE_ORDER]
    return [(k, modules[k]) for k in order], target


def _refuse_if_offloaded(components, pipe) -> None:
    handles = [getattr(pipe, _MARK, None)] if pipe is not None else []
    for name, comp in components:
        handles += [getattr(m, _MARK, None) for m in comp.modules()]
    handle = next((h for h in handles if h is not None), None)
    if handle is not None:
        raise InputError(
            f"This {'pipeline' if pipe is not None else 'module'} already has {handle.mode} offload hooks. "
            "Call remove_offload(...) first: a second set of hooks would take the first one's device "
            "copies for CPU home copies.")


def _to_device(args: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    """Move the tensor arguments of a call to the device (top level only). Lists and dicts are left
    as they are: the UNet's up blocks pop skip connections from a list in place, so the list must
    stay the same object (tensors inside it are produced on the device anyway)."""
    def move(a):
        return a.to(device) if isinstance(a, torch.Tensor) and a.device != device else a
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _weight_units(module: nn.Module, prefix: str = "", skip: frozenset[int] = frozenset()):
    """Yield (name, module) for the modules that get their own hook in sequential offload: each
    module that owns tensors directly (a Linear, a Conv2d, CLIP's vision embeddings with its
    class_embedding) or reads its children's weights directly, taken with its whole subtree.
    Subtrees whose root id is in `skip` are left out (the blocks of group offloading)."""
    if id(module) in skip:
        return
    if _owns_tensors(module) or isinstance(module, _READS_CHILD_WEIGHTS):
        if _has_weights(module):
            yield prefix, module
        return
    for name, child in module.named_children():
        yield from _weight_units(child, _join(prefix, name), skip)


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
        self.units: list[_Unit] = []
        self._hooks: list = []  # torch.utils.hooks.RemovableHandle
        self._wrapped: list[tuple[nn.Module, str, object]] = []  # (module, method name, previous __dict__ entry)
        self._marked: list[object] = []
        self._pipe = None
        self._tensor_ids: set[int] = set()
        self._inside_compiled: set[int] = set()

    def add_unit(self, unit: _Unit) -> _Unit:
        shared = self._tensor_ids & unit.tensor_ids
        if shared:
            unit.restore()
            raise InputError(f"{unit.name!r} shares a weight with another offload unit (tied weights); "
                             "offloading it twice would break the tie. Offload the module that contains both.")
        self._tensor_ids |= unit.tensor_ids
        self.units.append(unit)
        return unit

    def hook(self, module: nn.Module, pre=None, post=None) -> None:
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
        self.attach(components, pipe)

    def attach(self, components, pipe) -> None:
        for _, comp in components:
            setattr(comp, _MARK, self)
            self._marked.append(comp)
        if pipe is not None:
            setattr(pipe, _MARK, self)
            self._marked.append(pipe)
            pipe._offload_device = self.device  # the pipeline's loop now runs on the device
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
            if getattr(obj, _MARK, None) is self:
                delattr(obj, _MARK)
        if self._pipe is not None:
            self._pipe._offload_device = None
        self._hooks, self._wrapped, self._marked, self.units, self._pipe = [], [], [], [], None


# ------------------------------------------------------------------------------------------------
# Sequential offload


@torch.compiler.disable
def _leaf_pre(unit: _Unit, module, args, kwargs):
    unit.onload()  # CPU -> device, just for this module's forward
    return _to_device(args, kwargs, unit.device)


@torch.compiler.disable
def _leaf_post(unit: _Unit, module, args, output):
    unit.offload()  # device copy dropped; the weights are back on the CPU only
    return None


def _add_leaf_units(handle: OffloadHandle, prefix: str, module: nn.Module, skip=frozenset()) -> None:
    for name, m in _weight_units(module, skip=skip):
        unit = handle.add_unit(_Unit(_join(prefix, name), "leaf", [m], handle.device))
        handle.hook(m, pre=functools.partial(_leaf_pre, unit), post=functools.partial(_leaf_post, unit))


def enable_sequential_cpu_offload(target, device="cuda") -> OffloadHandle:
    """Keep every weight on the CPU; each module that owns weights visits `device` just for its
    own forward. `target`: a pipeline (all its model components) or one nn.Module.
    Entry points other than forward (vae.encode / vae.decode) need nothing extra: every weight
    belongs to a module with its own hook, and those modules run inside encode / decode."""
    device = _check_device(device)
    components, pipe = _components(target)
    _refuse_if_offloaded(components, pipe)
    handle = OffloadHandle("sequential", device)
    with handle.installing(components, pipe):
        for name, comp in components:
            _add_leaf_units(handle, name, comp)
    return handle


# ------------------------------------------------------------------------------------------------
# Model offload


class _ModelChain:
    """At most one component on the device: calling another one sends the current one home."""

    def __init__(self):
        self.current: _Unit | None = None

    @torch.compiler.disable
    def activate(self, unit: _Unit, args: tuple, kwargs: dict):
        if self.current is not unit:
            if self.current is not None:
                self.current.offload()  # previous component: device copy dropped
            unit.onload()  # this component: CPU -> device, stays until another component is called
            self.current = unit
        return _to_device(args, kwargs, unit.device)


def enable_model_cpu_offload(target, device="cuda") -> OffloadHandle:
    """Whole components on the device one at a time, in the order the pipeline calls them
    (text_encoder -> unet -> vae). A component is moved when its forward, or the VAE's encode /
    decode, is called, and stays until another component is called (the VAE stays after the last
    image until the next call starts with the text encoder)."""
    device = _check_device(device)
    components, pipe = _components(target)
    _refuse_if_offloaded(components, pipe)
    handle = OffloadHandle("model", device)
    chain = _ModelChain()
    with handle.installing(components, pipe):
        for name, comp in components:
            unit = handle.add_unit(_Unit(name or type(comp).__name__, "component", [comp], device))
            handle.hook(comp, pre=lambda module, args, kwargs, unit=unit: chain.activate(unit, args, kwargs))
            for method in ("encode", "decode"):  # the VAE's entry points (they do not go through forward)
                if callable(getattr(type(comp), method, None)):
                    handle.wrap_method(comp, method, functools.partial(chain.activate, unit))
    return handle


# ------------------------------------------------------------------------------------------------
# Group offload


def _block_runs(root: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The model's blocks, as runs of consecutive blocks: search breadth-first for the shallowest
    level that has a ModuleList (or Sequential) with weights. Each such list gives one run (its
    children: the UNet's down_blocks.0, .1, ...; CLIP's encoder.layers.0, ...), and each other
    module at that level that has weights and children gives a run of its own (the UNet's
    mid_block and time_embedding, the VAE's mid blocks). Leaves at that level and everything above
    it (conv_in, norms, quant_conv) are not blocks."""
    level = [("", root)]
    while level:
        if any(isinstance(m, (nn.ModuleList, nn.Sequential)) and _has_weights(m) for _, m in level):
            runs = []
            for name, m in level:
                if isinstance(m, (nn.ModuleList, nn.Sequential)):
                    blocks = [(_join(name, k), c) for k, c in m.named_children() if _has_weights(c)]
                    if blocks:
                        runs.append((name, blocks))
                elif _has_weights(m) and any(True for _ in m.children()):
                    runs.append((name, [(name, m)]))
            return runs
        level = [(_join(name, k), c) for name, m in level for k, c in m.named_children()]
    return []


class _GroupSchedule:
    """Onloads a group when one of its blocks starts and offloads it after its last block.

    Prefetch: the schedule learns, for each group, which group ran after it last time (in a
    diffusion loop: the next block, and after the last up block the first group of the next
    step). When a group starts, its successor is copied on the side stream. Before that, every
    other resident group is sent home, so at most two groups (current + prefetched) are on the
    device, and a wrong guess (a group whose successor changed) costs one wasted copy, never
    correctness: a group that is not resident when it starts is onloaded synchronously."""

    def __init__(self, prefetch: bool, stream: torch.cuda.Stream | None):
        self.prefetch, self.stream = prefetch, stream
        self.groups: list[_Unit] = []
        self.current: _Unit | None = None
        self.previous: _Unit | None = None
        self.successor: dict[int, _Unit] = {}

    @torch.compiler.disable
    def enter(self, unit: _Unit, module, args, kwargs):
        if self.current is not unit:
            if self.previous is not None and self.previous is not unit:
                self.successor[id(self.previous)] = unit  # learn the execution order
            self.current = self.previous = unit
            for other in self.groups:
                if other is not unit and other.resident:
                    other.offload()  # a stale prefetch, or a group whose last block did not run
            if unit.resident:
                unit.wait_ready()  # prefetched: compute waits for the side-stream copy (GPU side)
            else:
                unit.onload()  # CPU -> device, synchronously on the compute stream
            nxt = self.successor.get(id(unit))
            if self.prefetch and nxt is not None and nxt is not unit and not nxt.resident:
                # CPU (pinned) -> device on the side stream, overlapping with this group's compute.
                # On the CPU rehearsal (stream None) the copy is synchronous: same schedule, no overlap.
                nxt.onload(stream=self.stream, prefetch=True)
        return _to_device(args, kwargs, unit.device)

    @torch.compiler.disable
    def exit(self, unit: _Unit, last: bool, module, args, output):
        if last:
            unit.offload()  # the group's last block is done: device copies dropped
            self.current = None
        return None


def _add_groups(handle: OffloadHandle, schedule: _GroupSchedule, cname: str, comp: nn.Module, runs,
                num_blocks_per_group: int, pin: bool) -> None:
    """One group unit per `num_blocks_per_group` consecutive blocks of each run, hooked on every
    block of the group; per-module (leaf) units for the rest of the component."""
    in_blocks: set[int] = set()
    for run_name, blocks in runs:
        for start in range(0, len(blocks), num_blocks_per_group):
            chunk = blocks[start:start + num_blocks_per_group]
            if len(blocks) == 1 and chunk[0][0] == run_name:
                gname = run_name  # a lone block such as mid_block
            else:
                first, last = start, start + len(chunk) - 1
                gname = f"{run_name}[{first}]" if first == last else f"{run_name}[{first}-{last}]"
            mods = [m for _, m in chunk]
            unit = handle.add_unit(_Unit(_join(cname, gname), "group", mods, handle.device, pin=pin))
            schedule.groups.append(unit)
            for m in mods:
                in_blocks.add(id(m))
                handle.hook(m, pre=functools.partial(schedule.enter, unit),
                            post=functools.partial(schedule.exit, unit, m is mods[-1]))
    _add_leaf_units(handle, cname, comp, skip=frozenset(in_blocks))


def apply_group_offloading(target, device="cuda", num_blocks_per_group: int = 1,
                           use_stream: bool = False) -> OffloadHandle:
    """Offload groups of `num_blocks_per_group` consecutive blocks together (see _block_runs for
    what a block is); the modules outside the blocks get sequential (per-module) hooks.
    `target`: one nn.Module, or a pipeline (every component; the pipeline's loop then runs on
    `device`). use_stream=True: prefetch the next group while the current one computes, from
    pinned CPU memory on a side CUDA stream; on device='cpu' the same prefetch schedule runs with
    synchronous copies (a rehearsal for tests: nothing can overlap)."""
    if not isinstance(num_blocks_per_group, int) or num_blocks_per_group < 1:
        raise InputError(f"num_blocks_per_group must be a positive integer, got {num_blocks_per_group!r}.")
    device = _check_device(device)
    if use_stream and device.type not in ("cuda", "cpu"):
        raise InputError(f"use_stream=True needs a CUDA device (a side stream and pinned memory); got {device}.")
    components, pipe = _components(target)
    _refuse_if_offloaded(components, pipe)
    all_runs = [_block_runs(comp) for _, comp in components]
    for (_, comp), runs in zip(components, all_runs):
        if not runs:
            raise InputError(f"Found no blocks in {type(comp).__name__}: group offloading needs a ModuleList of "
                             "blocks (like the UNet's down_blocks or CLIP's encoder.layers).")
    stream = torch.cuda.Stream(device) if use_stream and device.type == "cuda" else None
    handle = OffloadHandle("group", device)
    # One schedule for all components: the learned order runs across them (the last UNet step
    # prefetches the VAE decoder's first group), and the two-groups bound holds for the pipeline.
    schedule = _GroupSchedule(prefetch=use_stream, stream=stream)
    with handle.installing(components, pipe):
        for (cname, comp), runs in zip(components, all_runs):
            _add_groups(handle, schedule, cname, comp, runs, num_blocks_per_group, pin=stream is not None)
    return handle


# ------------------------------------------------------------------------------------------------
# Removal


def remove_offload(target) -> None:
    """Remove every offload installed on a pipeline (and its components) or a module: hooks and
    wrappers go, and each weight is back on its original device in the same Parameter object
    (the very same tensor where it started on the CPU; a copy with equal values where it started on
    the accelerator or was pinned). Does nothing when there is nothing to remove."""
    if isinstance(target, OffloadHandle):
        target.remove()
        return
    handles = [getattr(target, _MARK, None)]
    if isinstance(target, nn.Module):
        handles += [getattr(m, _MARK, None) for m in target.modules()]
    else:
        components, _ = _components(target)
        handles += [getattr(m, _MARK, None) for _, comp in components for m in comp.modules()]
    seen: set[int] = set()
    for h in handles:
        if h is not None and id(h) not in seen:
            seen.add(id(h))
            h.remove()
