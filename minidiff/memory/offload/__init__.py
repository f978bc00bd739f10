"""CPU offloading: the weights live in CPU memory and visit the accelerator only to compute.

Three schedules (diffusers' names), from the simplest to the most elaborate; read them in this
order, one file each:

    sequential.py  enable_sequential_cpu_offload(pipe_or_module, device)
        Every module that owns weights moves to the device for its own forward and leaves right
        after. Device memory: the largest layer. Transfers: every weight at every UNet step (slow).
    model.py       enable_model_cpu_offload(pipe, device)
        Whole components, one at a time: the one that is called moves to the device and the one
        before it goes back. Device memory for weights: the largest component. Transfers: each
        component once per image; the UNet stays for all its steps.
    group.py       apply_group_offloading(module_or_pipe, device, num_blocks_per_group, use_stream=False)
        Groups of consecutive blocks move together for their forward, the modules outside the
        blocks as in sequential offload; use_stream=True prefetches the next group on a CUDA
        side stream while the current one computes (at most two groups on the device).

    remove_offload(target)
        Undo any of them: the same Parameter objects, with their values on their original device.

What they are built from, one concept per file:

    unit.py        the unit of transfer: a set of weights with CPU home copies, onload / offload,
                   and the ledger of what is on the device (the package's one shared state)
    install.py     OffloadHandle: hooks on, hooks off, atomically; the pipeline's
                   `execution_device`; how the hooks live with torch.compile
    tracer.py      OffloadTracer: records every move, and with check_compute=True fails any
                   operation that computes with a weight that was not onloaded

Testing without a GPU. Passing device="cpu" runs the real schedule as a rehearsal: every onload
still allocates a fresh tensor and copies into it, every offload drops it, so OffloadTracer sees
exactly the moves a GPU would see and the compute check can tell home copies from device copies;
it only saves no memory (a warning says so).

References: diffusers' pipelines/pipeline_utils.py (enable_model_cpu_offload,
enable_sequential_cpu_offload) and hooks/group_offloading.py; accelerate's hooks.py
(AlignDevicesHook, cpu_offload_with_hook); PyTorch docs for Module.register_forward_pre_hook,
Tensor.record_stream and CUDA streams / pinned memory.
"""

from minidiff.memory.offload.group import apply_group_offloading  # noqa: F401
from minidiff.memory.offload.install import OffloadHandle, remove_offload  # noqa: F401
from minidiff.memory.offload.model import enable_model_cpu_offload  # noqa: F401
from minidiff.memory.offload.sequential import enable_sequential_cpu_offload  # noqa: F401
from minidiff.memory.offload.tracer import OffloadEvent, OffloadTracer  # noqa: F401
