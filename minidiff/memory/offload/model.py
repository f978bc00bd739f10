"""Model offload: whole components on the accelerator, one at a time.

    enable_model_cpu_offload(pipe, device)

A component (text encoder, UNet, VAE) moves to the device when it is called and the one that was
there goes back. Device memory for weights: the largest component. Transfers: each component once
per image; the UNet stays for all its steps. The hooks move a component when it is called, not in
a fixed order, so any pipeline's own call order is followed (text_encoder -> unet -> vae for
text-to-image; DiffEdit also enters the VAE to encode).

Entry points. A forward pre-hook sees `component(...)`, but the VAE is entered through
`vae.encode(...)` and `vae.decode(...)`, which do not go through forward; those methods are wrapped
(install.py's `wrap_method`) to make the same move first.

References: diffusers' pipelines/pipeline_utils.py (enable_model_cpu_offload,
model_cpu_offload_seq), accelerate's big_modeling.py (cpu_offload_with_hook).
"""

from __future__ import annotations

import functools

import torch

from minidiff.memory.offload.install import OffloadHandle, offload_targets, to_device
from minidiff.memory.offload.unit import Unit


class _ModelChain:
    """At most one component on the device: calling another one sends the current one home."""

    def __init__(self):
        self.current: Unit | None = None

    @torch.compiler.disable
    def activate(self, unit: Unit, args: tuple, kwargs: dict):
        if self.current is not unit:
            if self.current is not None:
                self.current.offload()  # previous component: device copy dropped
            unit.onload()  # this component: CPU -> device, stays until another component is called
            self.current = unit
        return to_device(args, kwargs, unit.device)


def enable_model_cpu_offload(target, device="cuda") -> OffloadHandle:
    """Whole components on the device one at a time, in the order the pipeline calls them
    (text_encoder -> unet -> vae). A component is moved when its forward, or the VAE's encode /
    decode, is called, and stays until another component is called (the VAE stays after the last
    image until the next call starts with the text encoder)."""
    components, pipe, device = offload_targets(target, device)
    handle = OffloadHandle("model", device)
    chain = _ModelChain()
    with handle.installing(components, pipe):
        for name, comp in components:
            unit = handle.add_unit(Unit(name or type(comp).__name__, "component", [comp], device))
            handle.hook(comp, pre=lambda module, args, kwargs, unit=unit: chain.activate(unit, args, kwargs))
            for method in ("encode", "decode"):  # the VAE's entry points (they do not go through forward)
                if callable(getattr(type(comp), method, None)):
                    handle.wrap_method(comp, method, functools.partial(chain.activate, unit))
    return handle
