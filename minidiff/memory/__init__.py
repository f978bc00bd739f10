"""Memory and speed: CPU offload hooks, NF4 4-bit layers, regional compilation, channels-last.

The public names are imported lazily (on first use), as in minidiff/__init__.py: compile.py and
the offload hooks import torch._dynamo (about 1.7 s), which a pipeline that only loads NF4
weights (`minidiff.memory.nf4`) or the `minidiff` command should not pay for at start-up.
"""

from __future__ import annotations

from minidiff.lazy import lazy_names

# public name -> module that defines it
_PUBLIC = {
    "compile_blocks": "minidiff.memory.compile",
    "to_channels_last": "minidiff.memory.compile",
    "uncompile_blocks": "minidiff.memory.compile",
    "Conv2dNF4": "minidiff.memory.nf4",
    "LinearNF4": "minidiff.memory.nf4",
    "NF4Tensor": "minidiff.memory.nf4",
    "dequantize_nf4": "minidiff.memory.nf4",
    "load_quantized": "minidiff.memory.nf4",
    "quantize_model": "minidiff.memory.nf4",
    "quantize_nf4": "minidiff.memory.nf4",
    "save_quantized": "minidiff.memory.nf4",
    "OffloadTracer": "minidiff.memory.offload",
    "apply_group_offloading": "minidiff.memory.offload",
    "enable_model_cpu_offload": "minidiff.memory.offload",
    "enable_sequential_cpu_offload": "minidiff.memory.offload",
    "remove_offload": "minidiff.memory.offload",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
