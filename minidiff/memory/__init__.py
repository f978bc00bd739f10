"""Memory and speed: CPU offload hooks, NF4 4-bit layers, regional compilation, channels-last."""

from minidiff.memory.compile import compile_blocks, to_channels_last, uncompile_blocks  # noqa: F401
from minidiff.memory.nf4 import (  # noqa: F401
    Conv2dNF4,
    LinearNF4,
    NF4Tensor,
    dequantize_nf4,
    load_quantized,
    quantize_model,
    quantize_nf4,
    save_quantized,
)
from minidiff.memory.offload import (  # noqa: F401
    OffloadTracer,
    apply_group_offloading,
    enable_model_cpu_offload,
    enable_sequential_cpu_offload,
    remove_offload,
)
