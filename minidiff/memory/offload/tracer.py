"""OffloadTracer: watch the offload hooks work, and prove that they cover every weight.

The tracer subscribes to the ledger of unit.py while it is active and records every onload,
prefetch and offload, with what is resident after it. From that log it answers the questions the
tests and notebook 09 ask: how many units were on the device at once (one component for model
offload, one module for sequential, two groups for group offload with prefetch), how many bytes
crossed, what the peak weight memory on an accelerator would be.

The compute check. `OffloadTracer(check_compute=True)` also enters a TorchDispatchMode, which sees
every aten operation with its tensor arguments. It fails any operation, other than a unit's own
copy, that reads a CPU home copy (the ledger knows their storage addresses): that weight computed
without having been onloaded, so a hook is missing; for example a parent module that reads a
child's `.weight` directly, so that the child's hook never fires (sequential.py). On the CPU
rehearsal this is the only way to tell a forgotten weight from an onloaded one, since both live on
the same device.

References: PyTorch's torch.utils._python_dispatch.TorchDispatchMode ("__torch_dispatch__" in the
extending-PyTorch docs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minidiff.memory.offload.unit import LEDGER, Unit, storage_ptr


@dataclass(frozen=True)
class OffloadEvent:
    index: int  # position in the tracer's log
    action: str  # "onload", "prefetch" (onload on a side stream) or "offload"
    kind: str  # "component", "group" or "leaf"
    name: str  # e.g. "unet", "unet.down_blocks[0-1]", "unet.down_blocks.0.resnets.0.conv1"
    device: str  # where the unit's weights are after the event
    nbytes: int  # size of the unit's weights


class _ComputeCheck(TorchDispatchMode):
    """Fails any operation (other than an offload unit's own copy) that reads a weight's CPU home
    copy: that weight computed without having been onloaded, i.e. a hook is missing."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not LEDGER.transfers:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    owner = LEDGER.home_storages.get(storage_ptr(t))
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
    resident(k)       names of the units of kind k on the device now (as far as the tracer saw:
                      what was resident when it was entered, plus its events; empty before)
    max_resident(k)   the largest number of units of kind k on the device at one moment
    peak_bytes(k)     the largest total size of weights of kind k on the device at one moment
                      (with no kind: all kinds together; the weight memory an accelerator would hold)
    check_compute     also fail any op that computes with a weight that is not on the device
                      (a TorchDispatchMode: slow, test-only, and it makes torch.compile'd code
                      fall back to eager while active)
    """

    def __init__(self, check_compute: bool = False):
        self.check_compute = check_compute
        self._mode: _ComputeCheck | None = None
        self._start()

    def _start(self) -> None:
        self.events: list[OffloadEvent] = []
        self._after: list[tuple[str, ...]] = []  # resident unit names after each event
        self._resident: dict[int, Unit] = {}
        self._max_count: dict[str | None, int] = {}
        self._max_bytes: dict[str | None, int] = {}

    def __enter__(self) -> OffloadTracer:
        self._start()
        self._resident = dict(LEDGER.resident)  # what was on the device already
        self._update_peaks()
        LEDGER.listeners.append(self._record)
        if self.check_compute:
            self._mode = _ComputeCheck()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        LEDGER.listeners.remove(self._record)

    def _record(self, action: str, unit: Unit) -> None:
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
