"""The SD 1.x/2.x UNet against diffusers' UNet2DConditionModel.

Tiny random diffusers models are saved with `save_pretrained` and loaded through minidiff's
production loader (`from_pretrained`); both run the same inputs. The full-size official configs
are compared key by key on the meta device, and one full-size SD 1.5 forward runs on random
weights at a small latent.
"""

import json
import math
import shutil

import pytest
import torch

from helpers import assert_rel_close, max_rel_err
from minidiff.loading import load_strict
from minidiff.models.attention import attention_backend
from minidiff.models.embeddings import TimestepEmbedding, timestep_embedding
from minidiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel

diffusers = pytest.importorskip("diffusers")

# fp32 against fp32: both sides do the same operations, but the "math" backend sums the attention
# scores in another order than diffusers' SDPA, so a few ulps may differ (measured: 0 with "sdpa",
# ~1e-6 with "math"). 1e-5 leaves room for that and nothing else.
FP32_RTOL = 1e-5

SD1_LIKE = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,  # 4 heads (of 8 and 16 channels)
    norm_num_groups=32,
    use_linear_projection=False,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
SD2_LIKE = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=48,
    attention_head_dim=[2, 4, 4],  # per-level head counts, as SD 2.x's [5, 10, 20, 20]
    norm_num_groups=16,
    use_linear_projection=True,
    upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY = {"sd1": SD1_LIKE, "sd2": SD2_LIKE}

# The official unet/config.json values (stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
# and -2-1-base); everything else is at the diffusers default.
SD_BLOCKS = dict(
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2,
    in_channels=4,
    out_channels=4,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    mid_block_scale_factor=1,
)
SD15 = dict(SD_BLOCKS, sample_size=64, attention_head_dim=8, cross_attention_dim=768,
            use_linear_projection=False, upcast_attention=None)  # the current SD 1.5 file says null
SD21 = dict(SD_BLOCKS, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
            use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
            only_cross_attention=False, num_class_embeds=None)
SD21_BASE = dict(SD21, sample_size=64, upcast_attention=False)
OFFICIAL = {"sd15": SD15, "sd21": SD21, "sd21-base": SD21_BASE}


def diffusers_unet(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**config).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"sd1": (reference model, folder), "sd2": ...}: diffusers' own save_pretrained output."""
    out = {}
    for name, config in TINY.items():
        ref = diffusers_unet(config)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        out[name] = (ref, folder)
    return out


def inputs(config: dict, batch: int = 2, size: int = 16, tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 4, size, size, generator=g)
    context = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
    return x_t, context


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_matches_diffusers_fp32(checkpoints, name, backend):
    ref, folder = checkpoints[name]
    unet = UNet2DConditionModel.from_pretrained(folder)
    x_t, context = inputs(TINY[name])
    timesteps = {
        "int": 981,
        "float": 500.5,
        "0-d tensor": torch.tensor(261),
        "(B,) tensor": torch.tensor([1, 999]),  # a different t per sample
    }
    with torch.no_grad():
        for what, t in timesteps.items():
            want = ref(x_t, t, context).sample
            with attention_backend(backend):
                got = unet(x_t, t, context).sample
            assert_rel_close(got, want, FP32_RTOL, f"{name} {backend} timestep {what}")
        # A per-sample timestep really is per sample: not the same as giving everyone t = 1.
        same_t = ref(x_t, 1, context).sample
        assert max_rel_err(unet(x_t, torch.tensor([1, 999]), context).sample[1], same_t[1]) > 1e-3


def test_bf16_close_to_fp32_reference(checkpoints):
    """bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3); after ~30 rounded layers the
    output is off by ~1-2% of its range, for diffusers' own bf16 model as much as for ours
    (measured 1.0e-2 .. 1.8e-2 for both, over three seeds, both configs, both backends). So we
    require <= 4e-2 and at most twice diffusers' own bf16 error on the same input."""
    for name in ("sd1", "sd2"):
        ref, folder = checkpoints[name]
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        ref_bf16 = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
        x_t, context = inputs(TINY[name])
        with torch.no_grad():
            want = ref(x_t, 700, context).sample
            diffusers_err = max_rel_err(ref_bf16(x_t.bfloat16(), 700, context.bfloat16()).sample, want)
            for backend in ("math", "sdpa"):
                with attention_backend(backend):
                    got = unet(x_t.bfloat16(), 700, context.bfloat16()).sample
                assert got.dtype == torch.bfloat16
                err = max_rel_err(got, want)
                assert err <= 4e-2, f"{name} {backend}: bf16 error {err:.3e}"
                assert err <= 2 * diffusers_err, f"{name} {backend}: {err:.3e} vs diffusers' bf16 {diffusers_err:.3e}"


def test_save_pretrained_round_trip_into_diffusers(checkpoints, tmp_path):
    ref, folder = checkpoints["sd2"]
    unet = UNet2DConditionModel.from_pretrained(folder)
    unet.save_pretrained(tmp_path)
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert back.config.upcast_attention and back.config.use_linear_projection
    assert list(back.config.attention_head_dim) == [2, 4, 4]
    x_t, context = inputs(SD2_LIKE)
    with torch.no_grad():
        # Same weights, same diffusers code: bit-identical.
        assert torch.equal(back(x_t, 10, context).sample, ref(x_t, 10, context).sample)
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    assert again.config == unet.config


def test_diffusers_config_keys_are_all_understood(checkpoints):
    """Every key diffusers' save_pretrained writes is a config field or a checked fixed option, so
    loading a diffusers folder warns about nothing."""
    _, folder = checkpoints["sd1"]
    keys = json.loads((folder / "config.json").read_text()).keys()
    fields = set(UNet2DConditionConfig.__dataclass_fields__)
    ignored = set(UNet2DConditionModel.config_ignore)
    unknown = [k for k in keys if not k.startswith("_") and k not in fields | ignored]
    assert not unknown


def test_return_dict_like_diffusers(checkpoints):
    ref, folder = checkpoints["sd1"]
    unet = UNet2DConditionModel.from_pretrained(folder)
    x_t, context = inputs(SD1_LIKE)
    with torch.no_grad():
        out, ref_out = unet(x_t, 5, context), ref(x_t, 5, context)
        assert type(out).__name__ == type(ref_out).__name__ == "UNet2DConditionOutput"
        plain = out.sample
        assert isinstance(plain, torch.Tensor) and plain.shape == ref_out.sample.shape == (2, 4, 16, 16)
        assert torch.equal(out[0], plain)
        as_tuple = unet(x_t, 5, context, return_dict=False)
        assert type(as_tuple) is tuple and len(as_tuple) == len(ref(x_t, 5, context, return_dict=False)) == 1
        assert torch.equal(as_tuple[0], plain)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import TimestepEmbedding as RefMLP
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    for dim in (32, 33):
        for flip in (False, True):
            for shift in (0, 1):
                want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
                got = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
                torch.testing.assert_close(got, want, rtol=0, atol=0)  # same operations, same order
    for act, out_dim in (("silu", None), ("gelu", 12)):
        torch.manual_seed(0)
        ref = RefMLP(32, 64, act_fn=act, out_dim=out_dim)
        mlp = TimestepEmbedding(32, 64, act=act, out_dim=out_dim)
        load_strict(mlp, ref.state_dict())
        x = torch.randn(3, 32)
        assert_rel_close(mlp(x), ref(x), FP32_RTOL, f"TimestepEmbedding {act}")


# ----------------------------------------------------------------------------------------------
# Full-size official configs


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_config_has_diffusers_keys_and_shapes(name):
    config = OFFICIAL[name]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(config)
        unet = UNet2DConditionModel.from_config(config)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert got.keys() == want.keys()
    assert got == want
    assert sum(math.prod(s) for s in got.values()) > 8e8  # ~860M parameters in both families


def test_attention_head_dim_means_number_of_heads():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(SD15)
        sd21 = UNet2DConditionModel.from_config(SD21)

    def heads(block):  # (num_heads, head_dim) of a block's first transformer
        attn = block.attentions[0].transformer_blocks[0].attn1
        return attn.num_heads, attn.head_dim

    assert [heads(b) for b in sd15.down_blocks[:3]] == [(8, 40), (8, 80), (8, 160)]
    assert heads(sd15.mid_block) == (8, 160)
    assert [heads(b) for b in sd15.up_blocks[1:]] == [(8, 160), (8, 80), (8, 40)]
    assert [heads(b) for b in sd21.down_blocks[:3]] == [(5, 64), (10, 64), (20, 64)]
    assert heads(sd21.mid_block) == (20, 64)
    assert [heads(b) for b in sd21.up_blocks[1:]] == [(20, 64), (10, 64), (5, 64)]
    assert sd21.down_blocks[0].attentions[0].transformer_blocks[0].attn2.upcast
    assert not sd15.down_blocks[0].attentions[0].transformer_blocks[0].attn2.upcast
    # diffusers' rule: num_attention_heads, when set, wins over attention_head_dim.
    config = UNet2DConditionConfig(**dict(SD15, attention_head_dim=8, num_attention_heads=[5, 10, 20, 20]))
    assert config.num_heads_per_block() == [5, 10, 20, 20]


def random_weights(model: torch.nn.Module, seed: int = 0) -> dict:
    """A fast stand-in for a trained checkpoint. Drawing 860M fresh random numbers takes 10-20 s on
    2 cores, so one pool of a prime number (1,000,003) of N(0, 1) samples is tiled over all the
    weights, laid end to end: rows and tensors start at different points of the pool, so no two
    are alike. Weights ~ N(0, 1/fan_in) keep activations O(1); norm scales near 1; small biases."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    total = sum(math.prod(s) for s in shapes.values())
    pool = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed))
    flat = pool.repeat(-(-total // pool.numel()))[:total]
    state, offset = {}, 0
    for k, shape in shapes.items():
        w = flat[offset: offset + math.prod(shape)].view(shape)
        offset += w.numel()
        if w.ndim >= 2:
            w.mul_(1 / math.sqrt(math.prod(shape[1:])))
        elif "norm" in k and k.endswith("weight"):
            w.mul_(0.1).add_(1)
        else:
            w.mul_(0.1)
        state[k] = w
    return state


def test_full_size_sd15_forward_matches_diffusers():
    # ~13 s on 2 (shared) cores, mostly writing 3.4 GB of weights: under a minute, so not slow.
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(SD15)
        unet = UNet2DConditionModel.from_config(SD15)
    state = random_weights(unet)
    ref.load_state_dict(state, strict=True, assign=True)
    load_strict(unet, state)  # the same strict check from_pretrained uses; tensors are shared
    ref.eval(), unet.eval()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        want = ref(x_t, 999, context).sample
        assert want.abs().max() > 0.1  # a real signal, not a collapsed output
        for backend in ("sdpa", "math"):
            with attention_backend(backend):
                assert_rel_close(unet(x_t, 999, context).sample, want, FP32_RTOL, f"SD 1.5 full size, {backend}")


# ----------------------------------------------------------------------------------------------
# Bad input


def test_wrong_size_checkpoint_lists_keys(checkpoints, tmp_path):
    # SD2-like weights under an SD1-like config.json.
    _, sd1 = checkpoints["sd1"]
    _, sd2 = checkpoints["sd2"]
    shutil.copy(sd1 / "config.json", tmp_path / "config.json")
    shutil.copy(sd2 / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(ValueError) as info:
        UNet2DConditionModel.from_pretrained(tmp_path)
    message = str(info.value)
    assert "do not fit this model" in message
    assert "unexpected key(s)" in message  # the third level
    assert "wrong shape" in message
    # 1x1 conv (SD 1) vs Linear (SD 2) projections, and the 48- vs 32-wide text keys.
    assert "down_blocks.0.attentions.0.proj_in.weight: file (32, 32) vs model (32, 32, 1, 1)" in message
    assert "attn2.to_k.weight: file (32, 48) vs model (32, 32)" in message


@pytest.mark.parametrize(
    "option, value",
    [
        ("class_embed_type", "timestep"),
        ("dual_cross_attention", True),
        ("only_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("transformer_layers_per_block", 2),
        ("time_embedding_type", "fourier"),
        ("addition_embed_type", "text_time"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D"]),
        ("conv_in_kernel", 7),  # not a dataclass field: checked from the raw config.json
    ],
)
def test_unsupported_option_is_named(checkpoints, tmp_path, option, value):
    _, folder = checkpoints["sd1"]
    config = json.loads((folder / "config.json").read_text())
    config[option] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(ValueError, match=f"option {option}="):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_defaults_of_unsupported_options_are_accepted():
    # Lists of defaults too (diffusers allows per-level values).
    config = UNet2DConditionConfig(**dict(SD15, only_cross_attention=[False] * 4, transformer_layers_per_block=[1] * 4))
    assert config.upcast_attention is False  # null in the SD 1.5 file


def test_bad_inputs_raise_clear_errors(checkpoints):
    _, folder = checkpoints["sd2"]  # two downsamplers: sizes must be multiples of 4
    unet = UNet2DConditionModel.from_pretrained(folder)
    x_t, context = inputs(SD2_LIKE)
    with pytest.raises(ValueError, match="divisible by 4"):
        unet(torch.randn(2, 4, 16, 18), 1, context)
    with pytest.raises(ValueError, match=r"\(batch, tokens, 48\)"):
        unet(x_t, 1, torch.randn(2, 7, 32))
    with pytest.raises(ValueError, match="Batch sizes differ"):
        unet(x_t, 1, context[:1])
    with pytest.raises(ValueError, match="timestep"):
        unet(x_t, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="latents of shape"):
        unet(torch.randn(2, 3, 16, 16), 1, context)
    with pytest.raises(ValueError, match="cast the inputs"):
        unet(x_t.double(), 1, context.double())
    # 12 is divisible by 4 but not by 8: fine for this 3-level model.
    assert unet(torch.randn(2, 4, 12, 20), 1, context).sample.shape == (2, 4, 12, 20)
