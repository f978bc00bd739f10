"""The unit of transfer: a set of tensors (the parameters and buffers of some modules) that travel
between CPU memory and the accelerator together. Every schedule is built from these units: one per
module that owns weights (sequential), one per component (model), one per group of blocks (group).

Home copies. At install each tensor gets a CPU "home copy": the original tensor itself when it is
already on the CPU (no extra memory), a page-locked ("pinned") copy when the group schedule
prefetches on a CUDA side stream, and a one-time copy to the CPU when the weight was on the
accelerator (as diffusers does, so `pipe.to("cuda")` before offloading is harmless but pointless;
restore() moves such weights back). Onload sets `param.data` to a fresh copy on the device; offload
points `param.data` back at the home copy, which frees the device copy. Nothing is ever copied back:
offloading is for inference, which never writes weights (so training under offload is not
supported). The Parameter objects never change, so optimisers, state_dict() and weight tying by
object keep working.

The rehearsal. Onload copies with `copy=True`, so even with device="cpu" every onload allocates a
fresh tensor and every offload drops it: device copies and home copies never share memory, and an
OffloadTracer (tracer.py) sees exactly the moves a GPU would see. It only saves no memory.

The ledger. `LEDGER` is the one piece of state shared across the offload package (module-level on
purpose: units of different handles, on different models, must all report to a tracer opened
anywhere, and the tracer's compute check must recognise any unit's home copies). Only this file
writes it; tracer.py reads it and subscribes to its reports.

References: accelerate's hooks.py (AlignDevicesHook keeps weights on the CPU and swaps them in per
forward); PyTorch docs for Tensor.pin_memory, Tensor.record_stream, CUDA streams and events.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def storage_ptr(t: torch.Tensor) -> int:
    """The address of a tensor's storage (0 for tensors without a plain storage): two tensors with
    the same address read the same memory."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


class Ledger:
    """What every offload unit reports, for the tracer to read.

    resident       id(unit) -> unit, for every unit whose weights are on the device now
    home_storages  storage address of every CPU home copy -> the name of its unit
    transfers      > 0 while a unit copies weights (the compute check lets those reads through)
    listeners      callables (action, unit), called after every onload / prefetch / offload
    """

    def __init__(self):
        self.resident: dict[int, Unit] = {}
        self.home_storages: dict[int, str] = {}
        self.transfers = 0
        self.listeners: list = []

    @contextlib.contextmanager
    def transferring(self):
        self.transfers += 1
        try:
            yield
        finally:
            self.transfers -= 1

    def report(self, action: str, unit: Unit) -> None:
        for listener in self.listeners:
            listener(action, unit)


LEDGER = Ledger()


def has_weights(module: nn.Module) -> bool:
    """True when the module or any module below it holds a parameter or a buffer."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def owns_tensors(module: nn.Module) -> bool:
    """True when the module itself (not a child) holds a parameter or a buffer."""
    return (any(p is not None for p in module._parameters.values())
            or any(b is not None for b in module._buffers.values()))


def _slots(modules: list[nn.Module]) -> list[tuple[nn.Module, str, bool]]:
    """Where each tensor of the modules' subtrees is plugged in: (module, attribute, is_parameter),
    every Parameter / buffer object once."""
    slots, seen = [], set()
    for root in modules:
        for m in root.modules():
            for table, is_param in ((m._parameters, True), (m._buffers, False)):
                for key, t in table.items():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        slots.append((m, key, is_param))
    return slots


class Unit:
    """The parameters and buffers of `modules` (with their subtrees), moved together. `kind` is
    "component", "group" or "leaf": the tracer counts units by kind."""

    def __init__(self, name: str, kind: str, modules: list[nn.Module], device: torch.device, pin: bool = False):
        self.name, self.kind, self.device = name, kind, device
        self.resident = False
        self.ready: torch.cuda.Event | None = None  # set while a prefetch copy may still be running
        self.slots = _slots(modules)
        # ids of the Parameter / buffer objects, so an OffloadHandle can refuse tied weights.
        self.tensor_ids = {id(self._owner(slot)) for slot in self.slots}

        self.homes: list[torch.Tensor] = []
        self.originals: list[torch.Tensor | None] = []  # kept only where it *is* the home copy
        self.original_devices: list[torch.device] = []
        with LEDGER.transferring():
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
            if storage_ptr(home):
                LEDGER.home_storages[storage_ptr(home)] = self.name
        self.nbytes = sum(h.numel() * h.element_size() for h in self.homes)

    @staticmethod
    def _owner(slot) -> torch.Tensor:
        module, key, is_param = slot
        return module._parameters[key] if is_param else module._buffers[key]

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
        with LEDGER.transferring(), ctx:
            for slot, home in zip(self.slots, self.homes):
                # CPU home copy -> a new tensor on the device. copy=True makes a new tensor even when
                # the device is the CPU (rehearsal), so device copies and home copies never alias.
                self._set(slot, home.to(self.device, copy=True, non_blocking=home.is_pinned()))
            if stream is not None:
                self.ready = torch.cuda.Event()
                self.ready.record(stream)  # marks the end of this group's copies on the side stream
        self.resident = True
        LEDGER.resident[id(self)] = self
        LEDGER.report("prefetch" if prefetch else "onload", self)

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
        LEDGER.resident.pop(id(self), None)
        LEDGER.report("offload", self)

    def restore(self) -> None:
        """Put every tensor back where it was before offloading (remove_offload)."""
        self.offload()
        with LEDGER.transferring():
            for slot, home, original, device in zip(self.slots, self.homes, self.originals, self.original_devices):
                # The original tensor where we kept it (it was the CPU home copy); else CPU -> its device.
                self._set(slot, original if original is not None else home.to(device))
        for home in self.homes:
            LEDGER.home_storages.pop(storage_ptr(home), None)
