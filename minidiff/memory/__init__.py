from minidiff.memory.nf4 import LinearNF4, NF4Tensor, dequantize_nf4, load_quantized, quantize_model, quantize_nf4, save_quantized  # noqa: F401
