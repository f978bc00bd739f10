from minidiff.memory.nf4 import LinearNF4, NF4Tensor, dequantize_nf4, load_quantized, quantize_model, quantize_nf4, save_quantized  # noqa: F401
from minidiff.memory.offload import OffloadTracer, apply_group_offloading, enable_model_cpu_offload, enable_sequential_cpu_offload, remove_offload  # noqa: F401
from minidiff.memory.compile import compile_blocks, to_channels_last, uncompile_blocks  # noqa: F401
