"""NF4: 4-bit NormalFloat weight quantisation, bit-exact with bitsandbytes.

The gpt-fast recipe, in three visible steps:
    1. offline transform  `quantize_nf4(w)` -> NF4Tensor (packed 4-bit codes + per-block absmax);
                          `dequantize_nf4(state)` is its exact inverse up to the rounding
    2. module swap        `quantize_model(model)` replaces the hot-path nn.Linear layers (attention
                          q/k/v/out and feed-forward) by `LinearNF4`, whose forward is one line:
                          dequantise, then F.linear in the compute dtype; with convs=True
                          also every nn.Conv2d by `Conv2dNF4` (dequantise, reshape, F.conv2d)
    3. save / load        `save_quantized` / `load_quantized`: one safetensors file with the packed
                          buffers, the statistics and a JSON description of every swapped layer

Block-wise absmax quantisation (QLoRA section 3): the flattened weight is cut into blocks of
`block_size` (64) values; each block is divided by its absolute maximum, so it lies in [-1, 1],
and each value is replaced by the index of the nearest of the 16 NF4 code values. Two indices are
packed per byte, the FIRST element in the HIGH nibble, as a uint8 tensor of shape (ceil(n/2), 1).
Storage: 4 bits per weight + one fp32 absmax per 64 weights = 4.5 bits (0.14x of fp32).
Double quantisation ("compress_statistics", QLoRA section 3) subtracts the mean from the absmax
values and quantises them again to 8 bits in blocks of 256 with bitsandbytes' dynamic 8-bit code,
storing one fp32 absmax per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.

bitsandbytes' behaviour reproduced here (bitsandbytes 0.50.2, checked by tests/test_nf4.py):
  - nearest code = bucketize on the midpoints between neighbouring codes; a value exactly on a
    midpoint takes the lower code;
  - a weight whose size is not a multiple of the block size gets a shorter last block, and an odd
    size a padding code (the code of 0.0) in the low nibble of the last byte;
  - full blocks are scaled by the reciprocal of their absmax, the short last block by a division
    (the rounding differs in the last bit, which can move a value across a midpoint);
  - an all-zero block keeps absmax 0 (the short last block stores 1e-38 instead).
  The 8-bit step of double quantisation follows bitsandbytes' reference rule (nearest code, as
  above). Its CPU kernel looks the code up in a 65536-point table instead, which picks a
  neighbouring code for a few values; the dequantised absmax agree to the measured error stated
  in the tests.

References:
    Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314
    Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning", arXiv:1511.04561
    bitsandbytes.functional.quantize_4bit / dequantize_4bit, bitsandbytes.nn.Linear4bit
    gpt-fast quantize.py (the three-step structure)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.errors import InputError
from minidiff.loading import load_strict, read_state_dict, save_weights

# The 16 NF4 values, exactly as bitsandbytes stores them (float32). NF4 is a lookup table, not a
# float format: the values are quantiles of N(0, 1) normalised to [-1, 1], so that normally
# distributed weights fill the 16 bins about equally (QLoRA eq. 4). To have an exact 0 the two
# halves are built separately, 8 values above 0 and 7 below; `normal_float_code` recomputes them.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes accepts
NESTED_BLOCK_SIZE = 256  # double quantisation: 8-bit blocks of 256 absmax values (bitsandbytes)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def normal_float_code(offset: float = 0.9677083) -> torch.Tensor:
    """Recompute the NF4 values from quantiles of N(0, 1) (QLoRA section 3).

    The quantile function (ndtri) is evaluated at evenly spaced probabilities from `offset` down
    to 0.5 (9 points for the positive half, 8 for the negative one, mirrored; 0.5 gives the shared
    0), and the result is divided by its maximum. QLoRA's eq. 4 averages neighbouring quantiles
    instead; bitsandbytes' table is built this way. `offset` = 0.9677083 = (1 - 1/32 + 1 - 1/30) / 2,
    halfway between the centres of the outermost of 16 and of 15 equal-probability bins: the
    largest value is then the finite 1.848-sigma quantile rather than the infinite 100% one.
    """
    p_pos = torch.linspace(offset, 0.5, 9)[:-1].double()  # 8 probabilities > 0.5
    p_neg = torch.linspace(offset, 0.5, 8)[:-1].double()  # 7 probabilities > 0.5
    q = torch.cat([torch.special.ndtri(p_pos), -torch.special.ndtri(p_neg), torch.zeros(1, dtype=torch.float64)])
    q = q.float().sort().values
    return q / q.max()


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2016, section 3), 256 sorted values.

    A value is sign * 10^-e * f: a decimal exponent e = 6..0 and a linear fraction f. Exponent
    10^-e gets 2^(6-e) fractions, the midpoints of that many equal bins on [0.1, 1], so large
    values are finer; with both signs, 0 and 1 that is 2*(1+2+...+64) + 2 = 256 values.
    """
    values = [0.0, 1.0]
    for i in range(7):  # scale 10^(i-6), 2^i fractions
        edges = torch.linspace(0.1, 1, 2**i + 1)
        fractions = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * fractions).tolist() + (-(10 ** (i - 6)) * fractions).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


@dataclass
class NF4Tensor:
    """A quantised tensor. With double quantisation `absmax` holds 8-bit codes, and the fp32 absmax
    of block j is DYNAMIC_CODE[absmax[j]] * nested_absmax[j // 256] + nested_offset."""

    packed: torch.Tensor  # uint8 (ceil(n/2), 1): two 4-bit codes a byte, first in the high nibble
    absmax: torch.Tensor  # (num_blocks,) float32, or uint8 when double quantised
    shape: torch.Size
    dtype: torch.dtype  # the original dtype, which dequantisation returns
    block_size: int = 64
    nested_absmax: torch.Tensor | None = None  # (ceil(num_blocks/256),) float32
    nested_offset: torch.Tensor | None = None  # () float32: the mean of the absmax

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value; a value exactly between two codes takes the lower one."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device)).to(torch.uint8)


def _blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax-quantise the flat fp32 `x` block by block: (codes (n,) uint8, absmax (num_blocks,))."""
    n = x.numel()
    num_blocks = math.ceil(n / block_size)
    ragged = n % block_size != 0
    blocks = F.pad(x, (0, num_blocks * block_size - n)).view(num_blocks, block_size)  # zero padded
    absmax = blocks.abs().amax(dim=1)  # (num_blocks,)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]  # (num_blocks, block_size) in [-1, 1]
    if ragged:  # bitsandbytes divides the short last block and stores its clamped absmax
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    return _nearest_code(scaled.clamp(-1, 1).flatten()[:n], code), absmax


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantise a float tensor of any shape to NF4 (QLoRA), as bitsandbytes' quantize_4bit."""
    if weight.dtype not in FLOAT_DTYPES:
        raise InputError(f"NF4 quantises float32, float16 or bfloat16 tensors, not {weight.dtype}; "
                         "convert it first, e.g. weight.float().")
    if block_size not in BLOCK_SIZES:
        raise InputError(f"block_size must be one of {BLOCK_SIZES} (those bitsandbytes supports), not {block_size}.")
    if weight.numel() == 0:
        raise InputError("Cannot quantise an empty tensor.")
    codes, absmax = _blockwise(weight.detach().flatten().float(), NF4_CODE, block_size)
    if codes.numel() % 2:  # an odd size: pad with the code of 0.0, as bitsandbytes does
        codes = torch.cat([codes, codes.new_tensor([7])])
    packed = (codes[0::2] << 4 | codes[1::2]).unsqueeze(1)  # (ceil(n/2), 1): first code high
    state = NF4Tensor(packed, absmax, weight.shape, weight.dtype, block_size)
    if double_quant:
        offset = absmax.mean()
        codes8, nested_absmax = _blockwise(absmax - offset, DYNAMIC_CODE, NESTED_BLOCK_SIZE)
        state.absmax, state.nested_absmax, state.nested_offset = codes8, nested_absmax, offset
    return state


def dequantize_absmax(state: NF4Tensor) -> torch.Tensor:
    """The fp32 absmax of every block (undoing double quantisation if any)."""
    if not state.double_quant:
        return state.absmax
    n = state.absmax.numel()
    values = DYNAMIC_CODE.to(state.absmax.device)[state.absmax.long()]  # (num_blocks,)
    scale = state.nested_absmax.repeat_interleave(NESTED_BLOCK_SIZE)[:n]  # (num_blocks,)
    return values * scale + state.nested_offset


def dequantize_nf4(state: NF4Tensor) -> torch.Tensor:
    """NF4Tensor -> tensor of the original shape and dtype: code value times its block's absmax."""
    n = math.prod(state.shape)
    codes = torch.stack([state.packed >> 4, state.packed & 0xF], dim=-1).flatten()[:n]  # (n,)
    values = NF4_CODE.to(state.packed.device)[codes.long()]  # (n,) fp32 in [-1, 1]
    scale = dequantize_absmax(state).repeat_interleave(state.block_size)[:n]  # (n,)
    return (values * scale).view(state.shape).to(state.dtype)


def nf4_nbytes(numel: int, block_size: int = 64, double_quant: bool = False) -> int:
    """Bytes of an NF4 tensor of `numel` weights: packed codes + statistics."""
    num_blocks = math.ceil(numel / block_size)
    stats = num_blocks * 4 if not double_quant else num_blocks + 4 * math.ceil(num_blocks / NESTED_BLOCK_SIZE) + 4
    return (numel + 1) // 2 + stats


def _register_nf4_buffers(module: nn.Module, n: int, block_size: int, double_quant: bool, device) -> None:
    """Empty buffers for an n-element weight: packed codes (two per byte), one absmax per block
    (8-bit codes plus nested statistics with double quantisation)."""
    num_blocks = math.ceil(n / block_size)
    module.register_buffer("weight", torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device))
    absmax_dtype = torch.uint8 if double_quant else torch.float32
    module.register_buffer("absmax", torch.empty(num_blocks, dtype=absmax_dtype, device=device))
    if double_quant:
        module.register_buffer("nested_absmax", torch.empty(math.ceil(num_blocks / NESTED_BLOCK_SIZE), device=device))
        module.register_buffer("nested_offset", torch.empty((), device=device))


class LinearNF4(nn.Module):
    """nn.Linear with an NF4 weight: packed codes and statistics are buffers, the bias a parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 64,
                 double_quant: bool = False, dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if block_size not in BLOCK_SIZES:
            raise InputError(f"block_size must be one of {BLOCK_SIZES}, not {block_size}.")
        if dtype not in FLOAT_DTYPES or (compute_dtype is not None and compute_dtype not in FLOAT_DTYPES):
            raise InputError(f"dtype and compute_dtype must be one of {FLOAT_DTYPES}, not {dtype} / {compute_dtype}.")
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, double_quant
        self.dtype, self.compute_dtype = dtype, compute_dtype
        # The buffers are placeholders: `from_linear` or a state dict (load_quantized) fills them.
        _register_nf4_buffers(self, in_features * out_features, block_size, double_quant, device)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = False,
                    compute_dtype: torch.dtype | None = None) -> "LinearNF4":
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size,
                    double_quant, w.dtype, compute_dtype, device=w.device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if w.is_meta:  # nothing to quantise: the shapes are enough (e.g. to count bytes)
            return layer
        state = quantize_nf4(w, block_size, double_quant)
        layer.weight, layer.absmax = state.packed, state.absmax
        if double_quant:
            layer.nested_absmax, layer.nested_offset = state.nested_absmax, state.nested_offset
        return layer

    @property
    def quant_state(self) -> NF4Tensor:
        nested = (self.nested_absmax, self.nested_offset) if self.double_quant else (None, None)
        return NF4Tensor(self.weight, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.dtype, self.block_size, *nested)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype or self.dtype  # the reference path; bitsandbytes fuses it on GPU
        bias = None if self.bias is None else self.bias.to(dt)
        return F.linear(x.to(dt), dequantize_nf4(self.quant_state).to(dt), bias).to(x.dtype)

    def describe(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "block_size": self.block_size, "double_quant": self.double_quant,
                "dtype": str(self.dtype).removeprefix("torch."),
                "compute_dtype": None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())


class Conv2dNF4(nn.Module):
    """nn.Conv2d with an NF4 weight. The (out, in / groups, kh, kw) weight is flattened and quantised
    block-wise exactly like a Linear weight (blocks of 64 consecutive values of the flat tensor);
    the forward dequantises, reshapes to the 4-D kernel and calls F.conv2d with the conv's stride,
    padding, dilation and groups. Not a bitsandbytes layer (bitsandbytes quantises only Linear);
    it lets the convolutions, most of SD's UNet parameters, shrink too."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, block_size: int = 64, double_quant: bool = False,
                 dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if block_size not in BLOCK_SIZES:
            raise InputError(f"block_size must be one of {BLOCK_SIZES}, not {block_size}.")
        if dtype not in FLOAT_DTYPES or (compute_dtype is not None and compute_dtype not in FLOAT_DTYPES):
            raise InputError(f"dtype and compute_dtype must be one of {FLOAT_DTYPES}, not {dtype} / {compute_dtype}.")
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)  # "same" / "valid" kept as is
        self.block_size, self.double_quant = block_size, double_quant
        self.dtype, self.compute_dtype = dtype, compute_dtype
        # Placeholders, as in LinearNF4: from_conv or a state dict fills them.
        n = out_channels * (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        _register_nf4_buffers(self, n, block_size, double_quant, device)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, block_size: int = 64, double_quant: bool = False,
                  compute_dtype: torch.dtype | None = None) -> "Conv2dNF4":
        if conv.padding_mode != "zeros":
            raise InputError(f"Conv2dNF4 supports zero padding only, not padding_mode={conv.padding_mode!r}; "
                             "exclude this layer from quantisation.")
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, block_size, double_quant, w.dtype, compute_dtype, device=w.device)
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
        if w.is_meta:  # shapes only (to count bytes)
            return layer
        # quantize_nf4 flattens the (out, in / groups, kh, kw) weight in its contiguous (NCHW) order,
        # whatever the memory format of the conv (channels-last or not).
        state = quantize_nf4(w.contiguous(), block_size, double_quant)
        layer.weight, layer.absmax = state.packed, state.absmax
        if double_quant:
            layer.nested_absmax, layer.nested_offset = state.nested_absmax, state.nested_offset
        return layer

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_channels, self.in_channels // self.groups, *self.kernel_size))

    @property
    def quant_state(self) -> NF4Tensor:
        nested = (self.nested_absmax, self.nested_offset) if self.double_quant else (None, None)
        return NF4Tensor(self.weight, self.absmax, self.weight_shape, self.dtype, self.block_size, *nested)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype or self.dtype
        bias = None if self.bias is None else self.bias.to(dt)
        w = dequantize_nf4(self.quant_state).to(dt)  # (out, in / groups, kh, kw)
        return F.conv2d(x.to(dt), w, bias, self.stride, self.padding, self.dilation, self.groups).to(x.dtype)

    def describe(self) -> dict:
        return {"kind": "conv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "block_size": self.block_size, "double_quant": self.double_quant,
                "dtype": str(self.dtype).removeprefix("torch."),
                "compute_dtype": None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind")


NF4_LAYERS = (LinearNF4, Conv2dNF4)


# ----------------------------------------------------------------------------------------------
# Swapping the layers of a model

# Default name patterns: the UNet's attention and feed-forward linears (diffusers / minidiff key
# names; proj_in/proj_out only where they are Linear, i.e. SD 2.x) and the CLIP text encoder's.
UNET_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
CLIP_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")
DEFAULT_INCLUDE = UNET_LINEARS + CLIP_LINEARS
# Top-level convolutions that convs=True leaves in float: the UNet reads its dtype from
# conv_in.weight (UNet2DConditionModel.dtype), and conv_in holds 11,520 of SD 1.5's 860M parameters.
KEEP_FLOAT_CONVS = ("conv_in",)


def _matches(name: str, patterns) -> bool:
    # fnmatch on the dotted module name, or on any tail of it that starts after a dot:
    # "to_q" matches "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", and
    # "down_blocks.0.*" matches everything under down_blocks.0.
    return any(fnmatchcase(name, p) or fnmatchcase(name, "*." + p) for p in patterns)


def select_linears(model: nn.Module, include=DEFAULT_INCLUDE, exclude=()) -> list[str]:
    """Names of the nn.Linear layers that `include` selects and `exclude` does not (fnmatch patterns)."""
    include, exclude = ((p,) if isinstance(p, str) else tuple(p) for p in (include, exclude))
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and _matches(name, include) and not _matches(name, exclude)]


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass
class QuantizeSummary:
    layers: list[str]
    weight_bytes_before: int  # the swapped layers' float weights
    weight_bytes_after: int  # their packed codes + statistics
    model_bytes_before: int  # every parameter and buffer of the model
    model_bytes_after: int

    @property
    def weight_ratio(self) -> float:
        return self.weight_bytes_after / self.weight_bytes_before

    @property
    def model_ratio(self) -> float:
        return self.model_bytes_after / self.model_bytes_before


def quantize_model(model: nn.Module, include=DEFAULT_INCLUDE, exclude=(), block_size: int = 64, double_quant: bool = False,
                   compute_dtype: torch.dtype | None = None, convs: bool = False) -> tuple[nn.Module, QuantizeSummary]:
    """Replace the selected nn.Linear layers of `model` (in place) by LinearNF4.

    `include` / `exclude` are fnmatch patterns on the dotted module names, matched against the
    whole name or any tail after a dot ("to_q", "ff.net.*", "up_blocks.3.*"). A model on the meta
    device is swapped without quantising (useful to count bytes).

    convs=True also replaces every nn.Conv2d not matched by `exclude` (nor in KEEP_FLOAT_CONVS) by Conv2dNF4 (bitsandbytes and
    diffusers' BitsAndBytesConfig quantise Linear layers only, hence the default False). In SD's
    UNet the convolutions hold most of the parameters: Linear-only NF4 leaves the whole UNet at
    ~0.76x of its fp32 bytes; with the convolutions and include="*" (every Linear) 0.141x
    (tests/test_nf4.py, SD 1.5 config on the meta device).
    """
    names = select_linears(model, include, exclude)
    if convs:
        exclude_t = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        names += [name for name, m in model.named_modules() if type(m) is nn.Conv2d and name not in KEEP_FLOAT_CONVS
                  and not _matches(name, exclude_t)]
    if not names:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        raise InputError(f"No nn.Linear layer of {type(model).__name__} matches include={tuple(include)} "
                         f"and not exclude={tuple(exclude)}. Its Linear layers are e.g. {linears[:5]}.")
    before = _nbytes(model)
    weight_before = weight_after = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)  # an nn.Linear, or an nn.Conv2d when convs=True
        if isinstance(linear, nn.Conv2d):
            layer = Conv2dNF4.from_conv(linear, block_size, double_quant, compute_dtype)
        else:
            layer = LinearNF4.from_linear(linear, block_size, double_quant, compute_dtype)
        setattr(parent, child, layer)
        weight_before += linear.weight.numel() * linear.weight.element_size()
        weight_after += sum(b.numel() * b.element_size() for b in layer.buffers())
    return model, QuantizeSummary(names, weight_before, weight_after, before, _nbytes(model))


# ----------------------------------------------------------------------------------------------
# Save / load

METADATA_KEY = "minidiff_nf4"


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the whole state dict (NF4 buffers included) to one safetensors file, with a JSON
    description of each LinearNF4 / Conv2dNF4 layer in the file's metadata."""
    layers = {name: m.describe() for name, m in model.named_modules() if isinstance(m, NF4_LAYERS)}
    if not layers:
        raise InputError("The model has no LinearNF4 layer: call quantize_model(model) first, or save it with save_pretrained.")
    path = Path(path)
    metadata = {METADATA_KEY: json.dumps({"version": 1, "layers": layers})}
    return save_weights(model.state_dict(), path.parent, path.name, metadata=metadata)[0]


def check_quantized_keys(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "the state dict") -> None:
    """Raise a clear error when `state_dict` holds NF4 layers that are still float nn.Linear in `model`."""
    float_layers = [k.removesuffix(".absmax") for k in state_dict if k.endswith(".absmax")
                    and isinstance(_get(model, k.removesuffix(".absmax")), (nn.Linear, nn.Conv2d))]
    if float_layers:
        raise InputError(f"{source} holds NF4-quantised weights for {len(float_layers)} layer(s) (e.g. {float_layers[0]!r}) that "
                         "are float nn.Linear / nn.Conv2d in this model. Load it with minidiff.memory.load_quantized(model, path), which "
                         "swaps the layers first, or call quantize_model(model) before loading the state dict.")


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _conv_from_description(name: str, d: dict, module: nn.Module | None, path: Path) -> Conv2dNF4:
    """An empty Conv2dNF4 for the float nn.Conv2d `module`, as save_quantized described it."""
    pad = d["padding"] if isinstance(d["padding"], str) else tuple(d["padding"])
    if (type(module) is not nn.Conv2d or (module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                           module.padding, module.dilation, module.groups)
            != (d["in_channels"], d["out_channels"], tuple(d["kernel_size"]), tuple(d["stride"]), pad,
                tuple(d["dilation"]), d["groups"])):
        raise InputError(f"{str(path)!r} describes an NF4 convolution {name!r} ({d}), but the model has {module!r} there: "
                         "is it the right model, or was it quantised with other settings?")
    dtypes = {k: getattr(torch, d[k]) if d[k] else None for k in ("dtype", "compute_dtype")}
    return Conv2dNF4(d["in_channels"], d["out_channels"], d["kernel_size"], d["stride"], pad, d["dilation"],
                     d["groups"], d["bias"], d["block_size"], d["double_quant"], dtypes["dtype"],
                     dtypes["compute_dtype"], device=module.weight.device)


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by `save_quantized` into `model`, a float model of the same architecture
    (loaded, or built on the meta device): the layers the file describes become LinearNF4 (or
    Conv2dNF4), then
    every tensor is loaded strictly (missing, unexpected and mis-shaped keys are reported)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No quantised model file at {str(path)!r}.")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise InputError(f"{str(path)!r} was not written by save_quantized (its metadata has no {METADATA_KEY!r} entry). "
                         "A float checkpoint loads with from_pretrained; quantise it afterwards with quantize_model.")
    for name, d in json.loads(metadata[METADATA_KEY])["layers"].items():
        module = _get(model, name)
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, NF4_LAYERS) and module.describe() == d:
            continue
        if d.get("kind") == "conv2d":  # LinearNF4 descriptions have no "kind" (files of version 1)
            setattr(model.get_submodule(parent_name), child, _conv_from_description(name, d, module, path))
            continue
        if type(module) is not nn.Linear or (module.in_features, module.out_features) != (d["in_features"], d["out_features"]):
            raise InputError(f"{str(path)!r} describes an NF4 layer {name!r} ({d}), but the model has {module!r} there: "
                             "is it the right model, or was it quantised with other settings?")
        dtypes = {k: getattr(torch, d[k]) if d[k] else None for k in ("dtype", "compute_dtype")}
        layer = LinearNF4(d["in_features"], d["out_features"], d["bias"], d["block_size"], d["double_quant"],
                          dtypes["dtype"], dtypes["compute_dtype"], device=module.weight.device)
        setattr(model.get_submodule(parent_name), child, layer)
    state = read_state_dict([path])
    check_quantized_keys(model, state, repr(str(path)))
    load_strict(model, state, source=repr(str(path)))
    if hasattr(model, "_init_non_persistent_buffers"):  # buffers left on the meta device (PretrainedMixin)
        model._init_non_persistent_buffers()
    return model
