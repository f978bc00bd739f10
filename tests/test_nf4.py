"""NF4 quantisation (minidiff/memory/nf4.py) against bitsandbytes on the CPU.

What is checked:
  - the 16 NF4 values and the dynamic 8-bit code equal bitsandbytes' constants, and the NF4 values
    are recomputed from quantiles of N(0, 1);
  - `quantize_nf4` is bit-exact with `bitsandbytes.functional.quantize_4bit(quant_type="nf4")`:
    packed bytes (and their shape) and absmax EQUAL, for fp32 / bf16 / fp16, block sizes 64 and
    128, shapes whose size is not a multiple of the block size or is odd, all-zero blocks, and
    values exactly between two codes; dequantisation equal to bitsandbytes';
  - double quantisation ("compress_statistics"): offset, nested absmax and packed codes equal,
    the 8-bit absmax codes nearly all equal, and every dequantised absmax at least as close to the
    exact one as bitsandbytes' (measured errors below);
  - LinearNF4: forward == F.linear on the dequantised weight, == bitsandbytes' Linear4bit, close
    to the float layer; a compute dtype;
  - quantize_model on a tiny UNet (diffusers, loaded by minidiff's from_pretrained) and a tiny CLIP
    text encoder: the swapped names, the output error, the byte ratios; on the full SD 1.5 / 2.1
    configs built on the meta device, the byte counts without allocating anything;
  - save_quantized / load_quantized round trip; the errors for bad input;
  - Conv2dNF4 (not in bitsandbytes): forward == F.conv2d on the dequantised weight for SD's conv
    shapes; quantize_model(convs=True) on a tiny UNet (exact against dequantised weights, stated
    error); SD 1.5's UNet on the meta device <= 0.16x of its fp32 bytes; save / load round trip.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import max_rel_err
from torch import nn

from minidiff.loading import load_strict, read_json
from minidiff.memory import nf4
from minidiff.memory.nf4 import (
    LinearNF4,
    NF4Tensor,
    dequantize_nf4,
    load_quantized,
    quantize_model,
    quantize_nf4,
    save_quantized,
)
from minidiff.models.unet import UNet2DConditionModel

try:  # the reference; the tests that do not compare with it run without it
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_F
except ImportError:
    bnb = bnb_F = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="needs bitsandbytes (pip install -e '.[test]')")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (77, 3) and (33, 7): sizes that are not a multiple of the block and odd (a padding nibble);
# (77, 128) a whole number of blocks but not of rows of 64; (5,) shorter than one block.
SHAPES = [(64, 64), (320, 768), (77, 128), (77, 3), (33, 7), (5,)]


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantisation, from the kernel that is right for this shape.

    bitsandbytes 0.50.2's C++ CPU kernel (measured on an AVX-512 machine) indexes the blocks row
    by row, so it is wrong when a row is not a whole number of blocks: (64, 64) with block 128
    gives a max error of 1.65 against the weight instead of 0.44. Its pure-PyTorch reference
    kernel indexes the flat tensor, like CUDA and like the quantiser; that one is used then.
    """
    shape = state.shape
    # Both kernels' pure-PyTorch paths are wrapped in torch.compile by bitsandbytes: eager is the
    # same arithmetic without seconds of compiling for each new shape.
    with torch.compiler.set_stance("force_eager"):
        if shape[-1] % state.blocksize == 0 or shape[-1] % 2 == 1:  # the C++ kernel, or its own fallback
            return bnb_F.dequantize_4bit(packed, state, quant_type="nf4")
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        code = bnb_F.get_4bit_type("nf4", device="cpu")
        return _dequantize_4bit_compute(packed.reshape(-1), state.absmax, code, state.blocksize, shape, state.dtype)


# ----------------------------------------------------------------------------------------------
# The code values


@needs_bnb
def test_code_values_equal_bitsandbytes():
    assert torch.equal(nf4.NF4_CODE, bnb_F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC_CODE, bnb_F.create_dynamic_map())


def test_nf4_values_are_normal_quantiles():
    # Recomputed from N(0, 1) quantiles with torch.special.ndtri in float64: measured bit-equal
    # to the stored constants (scipy's ppf may differ in the last bit; allow 1 ulp of 1.0).
    torch.testing.assert_close(nf4.normal_float_code(), nf4.NF4_CODE, rtol=0, atol=1.2e-7)
    assert nf4.NF4_CODE[7] == 0 and (nf4.NF4_CODE > 0).sum() == 8 and (nf4.NF4_CODE < 0).sum() == 7
    assert (nf4.NF4_CODE.diff() > 0).all() and (nf4.DYNAMIC_CODE.diff() >= 0).all()


# ----------------------------------------------------------------------------------------------
# Bit-exactness of the 4-bit quantisation


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_is_bit_exact_with_bitsandbytes(shape, block_size, dtype):
    w = torch.randn(shape).to(dtype)
    if w.numel() >= 4 * block_size:
        w.view(-1)[block_size: 3 * block_size] = 0  # whole zero blocks: absmax 0
    packed, state = bnb_F.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, block_size)
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == packed.shape  # ((n + 1) // 2, 1)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    out = dequantize_nf4(ours)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, bnb_dequantize(packed, state))


@needs_bnb
def test_values_between_two_codes_take_the_lower_one_like_bitsandbytes():
    midpoints = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(33)])  # one block, absmax 1
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w, 64)
    assert torch.equal(ours.packed, packed)
    codes = torch.stack([ours.packed >> 4, ours.packed & 15], -1).flatten()
    assert torch.equal(codes[1:16].long(), torch.arange(15))  # midpoint i -> code i, the lower


@needs_bnb
def test_full_blocks_use_the_reciprocal_the_short_last_block_divides():
    # x / absmax and x * (1 / absmax) differ in the last bit here, and that bit moves the value
    # across the midpoint between codes 0 and 1 (found by a search over random absmax).
    absmax, x = 0.9017173051834106, -0.7647431492805481
    w = torch.tensor([absmax, x] + [0.0] * 62 + [absmax, x])  # a full block, then a block of 2
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w, 64)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    assert ours.packed[0, 0] & 15 == 1 and ours.packed[32, 0] & 15 == 0  # the same x, two codes


@needs_bnb
def test_all_zero_blocks_like_bitsandbytes():
    w = torch.zeros(64 + 64 + 36)
    w[64:128] = torch.randn(64)  # zero full block, random block, zero short block
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w, 64)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    assert ours.absmax[0] == 0 and ours.absmax[2] == torch.tensor(1e-38)  # bitsandbytes' clamp
    assert torch.equal(dequantize_nf4(ours), bnb_dequantize(packed, state))


def test_odd_size_pads_the_last_byte_with_the_code_of_zero():
    ours = quantize_nf4(torch.randn(7, 11), 64)  # 77 values: 39 bytes, 2 blocks (64 + 13)
    assert ours.packed.shape == (39, 1) and ours.absmax.shape == (2,)
    assert ours.packed[-1, 0] & 15 == 7  # NF4_CODE[7] == 0.0


# ----------------------------------------------------------------------------------------------
# Double quantisation of the absmax


@needs_bnb
@pytest.mark.parametrize("shape", [(320, 768), (640, 2560)], ids=str)
def test_double_quant_against_bitsandbytes(shape):
    w = torch.randn(shape)
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(ours.packed, packed)  # the 4-bit codes use the exact absmax
    assert torch.equal(ours.nested_offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert ours.absmax.dtype == torch.uint8 and ours.absmax.shape == state.absmax.shape
    # The 8-bit codes: we take the nearest code (bitsandbytes' reference rule); its CPU kernel
    # rounds x/absmax onto a 65536-point grid first and takes the code nearest to the grid point,
    # which picks a neighbour for a few values. Measured: 7 of 3840 and 41 of 25600 differ.
    assert (ours.absmax != state.absmax).float().mean() < 0.005
    exact = quantize_nf4(w, 64).absmax
    theirs = bnb_F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    mine = nf4.dequantize_absmax(ours)
    # Each of our absmax is at least as close to the exact one (up to one fp32 rounding).
    assert ((mine - exact).abs() <= (theirs - exact).abs() + 4e-7 * exact.max()).all()
    # Measured max |error| / max absmax: 3.04e-3 for both (320x768); 3.240e-3 ours, 3.248e-3
    # bitsandbytes' (640x2560). That is the 8-bit step of the largest values.
    assert max_rel_err(mine, exact) <= max_rel_err(theirs, exact) + 1e-7
    assert max_rel_err(mine, exact) < 5e-3
    # Our dequantisation of bitsandbytes' own state is bit-exact with bitsandbytes'.
    theirs_state = NF4Tensor(packed, state.absmax, w.shape, w.dtype, 64, state.state2.absmax, state.offset)
    assert torch.equal(dequantize_nf4(theirs_state), bnb_dequantize(packed, state))
    # And the weights: measured max error / max |w| 0.123 and 0.118, equal to bitsandbytes'.
    assert max_rel_err(dequantize_nf4(ours), w) <= max_rel_err(bnb_dequantize(packed, state), w) + 1e-3


# ----------------------------------------------------------------------------------------------
# LinearNF4


@needs_bnb
def test_linear_nf4_forward():
    linear = nn.Linear(128, 96)
    layer = LinearNF4.from_linear(linear)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y, F.linear(x, dequantize_nf4(layer.quant_state), linear.bias))
        # Against the float layer: the 4-bit rounding of uniform(-1/sqrt(128), 1/sqrt(128))
        # weights. Measured max relative error 0.090.
        assert max_rel_err(y, linear(x)) < 0.15

        # bitsandbytes' Linear4bit on the CPU (train mode, no grad: dequantise + F.linear).
        ref = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
        ref.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                       compress_statistics=False)
        ref.bias = nn.Parameter(linear.bias.data.clone())
        ref = ref.to("cpu")
        assert torch.equal(ref.weight.data, layer.weight)
        assert torch.equal(ref(x), y)

        # A bf16 compute dtype: input, weight and bias cast to bf16, output back to fp32.
        half = LinearNF4.from_linear(linear, compute_dtype=torch.bfloat16)
        y16 = half(x)
        assert y16.dtype == torch.float32
        expected = F.linear(x.bfloat16(), dequantize_nf4(half.quant_state).bfloat16(), linear.bias.bfloat16())
        assert torch.equal(y16, expected.float())


# ----------------------------------------------------------------------------------------------
# quantize_model


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


@pytest.fixture(scope="module")
def tiny_unet_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from minidiff.reference import tiny_unet

    folder = tmp_path_factory.mktemp("nf4") / "unet"
    tiny_unet("sd2").save_pretrained(folder)  # linear proj_in/proj_out, as SD 2.x
    return folder


EXPECTED_UNET_SUFFIXES = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                          "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"}


def _suffix(name):
    return next(s for s in EXPECTED_UNET_SUFFIXES if name.endswith("." + s))


def test_quantize_model_on_a_tiny_unet(tiny_unet_folder):
    unet = UNet2DConditionModel.from_pretrained(tiny_unet_folder)
    x, t, context = _unet_inputs()
    with torch.no_grad():
        reference = unet(x, t, context).sample
        float_copy = copy.deepcopy(unet)
        _, summary = quantize_model(unet)
        out = unet(x, t, context).sample

        # Every attention / feed-forward Linear of the 7 transformer blocks, nothing else.
        linears = {n for n, m in float_copy.named_modules() if isinstance(m, nn.Linear)}
        assert set(summary.layers) == {n for n in linears if any(n.endswith("." + s) for s in EXPECTED_UNET_SUFFIXES)}
        assert len(summary.layers) == 7 * 12
        assert {_suffix(n) for n in summary.layers} == EXPECTED_UNET_SUFFIXES
        assert all(isinstance(unet.get_submodule(n), LinearNF4) for n in summary.layers)
        assert isinstance(unet.time_embedding.linear_1, nn.Linear)  # not on the default list

        # The swap is exact: the float UNet with W := dequantize(quantize(W)) gives the same output.
        for name in summary.layers:
            float_copy.get_submodule(name).weight.copy_(dequantize_nf4(unet.get_submodule(name).quant_state))
        assert torch.equal(float_copy(x, t, context).sample, out)

    # The quantisation error of random tiny weights (uniform, not the normal weights NF4 is made
    # for) through 84 layers: measured max relative error 0.125 (0.133 in the Frobenius norm).
    err = max_rel_err(out, reference)
    assert 1e-3 < err < 0.25, err
    # 4 bits + one fp32 absmax per 64 weights = 4.5 / 32 = 0.1406 of the fp32 weights.
    assert summary.weight_ratio == pytest.approx(4.5 / 32) and summary.weight_ratio <= 0.16
    # Measured whole-model ratio 0.759 (the tiny UNet is mostly convolutions and norms).
    assert summary.model_ratio < 0.8


def test_double_quant_model_bytes(tiny_unet_folder):
    unet = UNet2DConditionModel.from_pretrained(tiny_unet_folder)
    _, summary = quantize_model(unet, double_quant=True)
    # 4 + 8/64 + 32/(64*256) bits per weight + one fp32 offset a layer: measured 0.1293.
    assert summary.weight_ratio < 0.135
    x, t, context = _unet_inputs()
    with torch.no_grad():
        assert torch.isfinite(unet(x, t, context).sample).all()


@pytest.mark.parametrize("name, n_swapped, n_conv_proj", [("stable-diffusion-v1-5", 160, 32), ("stable-diffusion-2-1", 192, 0)])
def test_full_size_unet_bytes_on_meta(name, n_swapped, n_conv_proj):
    """The official configs, built on the meta device: the byte counts, nothing allocated."""
    from minidiff.data import CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_json(CONFIGS / name / "unet", "config.json"))
    total = sum(p.numel() for p in unet.parameters())
    conv_proj = [n for n, m in unet.named_modules() if n.endswith(("proj_in", "proj_out")) and isinstance(m, nn.Conv2d)]
    _, summary = quantize_model(unet)
    swapped = sum(unet.get_submodule(n).in_features * unet.get_submodule(n).out_features for n in summary.layers)
    fraction = swapped / total
    print(f"\n{name}: {len(summary.layers)} layers, {fraction:.3f} of the UNet parameters; weights "
          f"{summary.weight_ratio:.4f}x, whole UNet {summary.model_bytes_before / 2**20:.0f} MiB -> "
          f"{summary.model_bytes_after / 2**20:.0f} MiB ({summary.model_ratio:.3f}x)")
    assert len(summary.layers) == n_swapped and len(conv_proj) == n_conv_proj
    assert summary.weight_ratio == pytest.approx(4.5 / 32, rel=1e-3)
    sizes = [unet.get_submodule(n).in_features * unet.get_submodule(n).out_features for n in summary.layers]
    assert summary.weight_bytes_after == sum(nf4.nf4_nbytes(size) for size in sizes)
    # Measured SD 1.5: 0.282 of the parameters are swapped, 3279 -> 2485 MiB (0.758x): the
    # 1 - 0.282 * (1 - 0.1406) = 0.758 that the fraction predicts (biases stay fp32).
    assert summary.model_ratio == pytest.approx(1 - fraction * (1 - summary.weight_ratio), abs=2e-3)


def test_quantize_model_on_a_tiny_clip(tmp_path):
    pytest.importorskip("transformers")
    from minidiff.models.clip import CLIPTextModel
    from minidiff.reference import tiny_text_encoder

    tiny_text_encoder("sd1").save_pretrained(tmp_path)
    model = CLIPTextModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).last_hidden_state
        _, summary = quantize_model(model, exclude=["layers.1.mlp.*"])
        out = model(ids).last_hidden_state
    names = {n.removeprefix("text_model.encoder.layers.") for n in summary.layers}
    assert names == {f"{i}.{s}" for i in (0, 1) for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.out_proj", "mlp.fc1", "mlp.fc2")} - {"1.mlp.fc1", "1.mlp.fc2"}
    # transformers' random initial weights; the final layer norm rescales the error: measured
    # max relative error 0.247 on the last hidden state (0.237 with all 12 layers).
    assert 1e-3 < max_rel_err(out, reference) < 0.5


# ----------------------------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize("double_quant", [False, True])
def test_save_and_load_round_trip(tiny_unet_folder, tmp_path, double_quant):
    unet = UNet2DConditionModel.from_pretrained(tiny_unet_folder)
    quantize_model(unet, double_quant=double_quant, exclude=["up_blocks.*"])
    path = save_quantized(unet, tmp_path / "unet-nf4.safetensors")

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        described = json.loads(f.metadata()["minidiff_nf4"])["layers"]
        assert f.get_tensor("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight").dtype == torch.uint8
    assert set(described) == {n for n, m in unet.named_modules() if isinstance(m, LinearNF4)}

    with torch.device("meta"):  # a float model of the same architecture, nothing allocated
        fresh = UNet2DConditionModel.from_config(read_json(tiny_unet_folder, "config.json"))
    load_quantized(fresh, path)
    x, t, context = _unet_inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, context).sample, unet(x, t, context).sample)
    assert all(isinstance(fresh.get_submodule(n), LinearNF4) for n in described)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_explains_itself(tiny_unet_folder, tmp_path):
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.randn(64, 64).double())
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(64, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="block_size must be one of"):
        quantize_nf4(torch.randn(64, 64), block_size=48)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.randn(0, 64))
    with pytest.raises(ValueError, match="compute_dtype"):
        LinearNF4.from_linear(nn.Linear(64, 64), compute_dtype=torch.int32)

    unet = UNet2DConditionModel.from_pretrained(tiny_unet_folder)
    with pytest.raises(ValueError, match="No nn.Linear layer"):
        quantize_model(unet, include=["no_such_layer"])
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(unet, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not written by save_quantized"):
        load_quantized(unet, tiny_unet_folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError):
        load_quantized(unet, tmp_path / "missing.safetensors")

    # An NF4 state dict into the float model.
    quantized = copy.deepcopy(unet)
    quantize_model(quantized)
    state = quantized.state_dict()
    with pytest.raises(ValueError, match="load_quantized"):
        nf4.check_quantized_keys(unet, state)
    with pytest.raises(ValueError, match="wrong shape"):  # the generic strict loader also refuses it
        load_strict(unet, state)

    # A file quantised with other settings than the model's NF4 layers.
    path = save_quantized(quantized, tmp_path / "nf4.safetensors")
    other = copy.deepcopy(unet)
    quantize_model(other, block_size=128)
    with pytest.raises(ValueError, match="other settings"):
        load_quantized(other, path)


# ----------------------------------------------------------------------------------------------
# Convolutions: Conv2dNF4 and quantize_model(..., convs=True)

from minidiff.memory.nf4 import Conv2dNF4  # noqa: E402

CONVS = [  # (in, out, kernel, stride, padding, groups): SD's 3x3 convs, its stride-2 downsampler,
    # 1x1 shortcuts / projections, an odd flat size (3*5*3*3 = 135: a short last block, a padding
    # nibble) and a grouped conv
    (8, 16, 3, 1, 1, 1), (16, 16, 3, 2, 1, 1), (16, 8, 1, 1, 0, 1), (5, 3, 3, 1, 1, 1), (8, 8, 3, 1, 1, 2),
]


@pytest.mark.parametrize("cin, cout, k, stride, padding, groups", CONVS)
def test_conv2d_nf4_forward(cin, cout, k, stride, padding, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups)
    layer = Conv2dNF4.from_conv(conv)
    x = torch.randn(2, cin, 9, 11)
    with torch.no_grad():
        y = layer(x)
        w_hat = dequantize_nf4(quantize_nf4(conv.weight))  # the flat weight quantised as one tensor
        assert torch.equal(dequantize_nf4(layer.quant_state), w_hat)
        # The forward IS F.conv2d on the dequantised, reshaped weight: exactly equal.
        assert torch.equal(y, F.conv2d(x, w_hat.view(conv.weight.shape), conv.bias, stride, padding, 1, groups))
        # Channels-last weights are flattened in their logical (NCHW) order: the same codes.
        cl = Conv2dNF4.from_conv(copy.deepcopy(conv).to(memory_format=torch.channels_last))
        assert torch.equal(cl.weight, layer.weight)
        # Against the float conv: 4-bit rounding of PyTorch's uniform init; measured max relative
        # error 0.082 .. 0.106 over these shapes.
        assert 1e-3 < max_rel_err(y, conv(x)) < 0.2
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == (conv.weight.numel() + 1) // 2


def test_quantize_model_with_convs_on_a_tiny_unet(tiny_unet_folder):
    unet = UNet2DConditionModel.from_pretrained(tiny_unet_folder)
    x, t, context = _unet_inputs()
    with torch.no_grad():
        reference = unet(x, t, context).sample
        float_copy = copy.deepcopy(unet)
        convs = {n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)} - {"conv_in"}
        _, summary = quantize_model(unet, convs=True)
        out = unet(x, t, context).sample
        assert convs <= set(summary.layers) and all(isinstance(unet.get_submodule(n), Conv2dNF4) for n in convs)
        # Every conv but conv_in (kept float: the UNet reads its dtype from conv_in.weight).
        assert [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)] == ["conv_in"]
        # Exact: the float UNet with every swapped weight replaced by its dequantised value.
        for name in summary.layers:
            float_copy.get_submodule(name).weight.copy_(
                dequantize_nf4(unet.get_submodule(name).quant_state).view_as(float_copy.get_submodule(name).weight))
        assert torch.equal(float_copy(x, t, context).sample, out)
    # Quantisation error of random (uniform) tiny weights through every conv and attention layer:
    # measured max relative error 0.215 (0.125 with the Linear layers alone, above).
    err = max_rel_err(out, reference)
    assert 1e-3 < err < 0.35, err
    assert summary.weight_ratio == pytest.approx(4.5 / 32, rel=0.02)

    # convs=True respects `exclude`.
    again = UNet2DConditionModel.from_pretrained(tiny_unet_folder)
    _, partial = quantize_model(again, exclude=["conv_out", "upsamplers.*"], convs=True)
    assert isinstance(again.conv_out, nn.Conv2d) and isinstance(again.up_blocks[0].upsamplers[0].conv, nn.Conv2d)
    assert "down_blocks.0.resnets.0.conv1" in partial.layers


def test_full_size_unet_with_convs_bytes_on_meta():
    """SD 1.5's UNet on the meta device: every conv and every Linear in NF4 gives <= 0.16x."""
    from minidiff.data import CONFIGS

    config = read_json(CONFIGS / "stable-diffusion-v1-5" / "unet", "config.json")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        default_linears = UNet2DConditionModel.from_config(config)
    _, summary = quantize_model(unet, include="*", convs=True)
    _, convs_only = quantize_model(default_linears, convs=True)
    print(f"\nSD 1.5 UNet, convs + every Linear: {len(summary.layers)} layers, {summary.model_bytes_before / 2**20:.0f} MiB -> "
          f"{summary.model_bytes_after / 2**20:.0f} MiB ({summary.model_ratio:.4f}x); convs + default Linears: "
          f"{convs_only.model_ratio:.4f}x")
    # Measured: 0.1411x with every Linear (what stays fp32: biases, norms, conv_in), 0.1689x when
    # the time-embedding Linears (the default list leaves them out) stay fp32. Byte counts: exact.
    assert summary.model_ratio <= 0.16
    assert summary.model_ratio < convs_only.model_ratio < 0.17


def test_save_and_load_round_trip_with_convs(tiny_unet_folder, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_unet_folder)
    quantize_model(unet, convs=True, double_quant=True)
    path = save_quantized(unet, tmp_path / "unet-nf4-convs.safetensors")
    with torch.device("meta"):
        fresh = UNet2DConditionModel.from_config(read_json(tiny_unet_folder, "config.json"))
    load_quantized(fresh, path)
    assert isinstance(fresh.conv_out, Conv2dNF4) and isinstance(fresh.down_blocks[0].downsamplers[0].conv, Conv2dNF4)
    x, t, context = _unet_inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, context).sample, unet(x, t, context).sample)

    # The file into a model whose conv differs: a clear error.
    with torch.device("meta"):
        other = UNet2DConditionModel.from_config(read_json(tiny_unet_folder, "config.json"))
    other.conv_out = nn.Conv2d(32, 4, 1, device="meta")  # 1x1 instead of 3x3
    with pytest.raises(ValueError, match="NF4 convolution 'conv_out'"):
        load_quantized(other, path)
    # An NF4 state dict into a float model (convs included): load_quantized is named.
    with pytest.raises(ValueError, match="load_quantized"):
        nf4.check_quantized_keys(UNet2DConditionModel.from_pretrained(tiny_unet_folder), unet.state_dict())
