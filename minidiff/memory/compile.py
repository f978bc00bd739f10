"""Speed without changing the maths: regional compilation and the channels-last memory format.

    compile_blocks(model_or_pipe, **compile_kwargs)
        "Regional" compilation: instead of torch.compile on the whole UNet (one huge graph, minutes
        of compile time), compile the blocks that repeat (every ResnetBlock2D, BasicTransformerBlock
        and CLIPEncoderLayer) with `block.compile(**compile_kwargs)`. nn.Module.compile compiles
        the block's __call__; TorchDynamo caches compiled code per *code object* (the class's
        forward) and, since PyTorch 2.5, treats a block's parameters as graph inputs, so blocks of
        the same class and the same shapes share one compiled graph: SD 1.5's 16 transformer
        blocks need 3 graphs (one per width), its 22 resnets 12 (widths, skip concatenations,
        with or without a shortcut conv; counted with a graph-counting backend on a meta-device
        UNet at 512x512), so compile time is a fraction of whole-model compilation while the
        blocks, where nearly all the FLOPs are, run compiled.
    uncompile_blocks(model_or_pipe)
        Back to eager (the compiled code stays in Dynamo's cache).
    to_channels_last(model_or_pipe)
        `module.to(memory_format=torch.channels_last)`: 4-D weights stored NHWC (channels
        densest), which cuDNN / oneDNN convolutions often prefer. Same values, same outputs up to
        float summation order (tests/test_compile.py checks 1e-5).

One global setting changes: Dynamo keeps at most `torch._dynamo.config.recompile_limit` (8 by
default) compiled versions of one code object and runs the rest eagerly (with a warning). SD 1.5's
resnets need 12, so compile_blocks raises the limit to RECOMPILE_LIMIT (64) if it is lower.

Offloading: compile_blocks combines with minidiff.memory.offload's model and group offload (the
hooks are torch.compiler.disable'd and sit on whole components or blocks); see offload/install.py.

References: PyTorch tutorial "Reducing torch.compile cold start compilation time with regional
compilation"; diffusers' ModelMixin.compile_repeated_blocks (`_repeated_blocks`) and the
"Reduce memory usage" / "torch.compile" docs (channels-last); torch.nn.Module.compile.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from minidiff.errors import InputError
from minidiff.memory.targets import model_components
from minidiff.models.clip import CLIPEncoderLayer
from minidiff.models.resnet import ResnetBlock2D
from minidiff.models.transformer import BasicTransformerBlock

# The blocks that repeat in minidiff's models (and carry nearly all the compute).
REPEATED_BLOCKS: tuple[type[nn.Module], ...] = (ResnetBlock2D, BasicTransformerBlock, CLIPEncoderLayer)
RECOMPILE_LIMIT = 64


def _modules(target) -> list[nn.Module]:
    """The model, or each model component of a pipeline (memory/targets.py, shared with offload)."""
    return [module for _, module in model_components(target)[0]]


def compile_blocks(target, block_types: tuple[type[nn.Module], ...] = REPEATED_BLOCKS, **compile_kwargs) -> list[str]:
    """Compile every block of `block_types` in a model or in each component of a pipeline with
    `block.compile(**compile_kwargs)` (e.g. backend="inductor", the default, or "aot_eager",
    mode="max-autotune", dynamic=...). Returns the names of the compiled blocks. Compilation
    happens lazily, at each block's first call with new shapes."""
    names = []
    for model in _modules(target):
        for name, module in model.named_modules():
            if isinstance(module, block_types):
                module.compile(**compile_kwargs)
                names.append(name)
    if not names:
        raise InputError(f"Found no blocks of types {[t.__name__ for t in block_types]} to compile in "
                         f"{type(target).__name__}; pass block_types=(...) with the classes that repeat.")
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    return names


def uncompile_blocks(target) -> None:
    """Undo compile_blocks (or any Module.compile inside target): calls run eagerly again."""
    for model in _modules(target):
        for module in model.modules():
            # nn.Module.compile stores the compiled __call__ in this attribute; None means eager.
            module._compiled_call_impl = None


def to_channels_last(target):
    """Store the 4-D (convolution) weights of a model, or of every component of a pipeline, in the
    channels-last layout; other tensors are untouched. Returns target."""
    for model in _modules(target):
        model.to(memory_format=torch.channels_last)
    return target
