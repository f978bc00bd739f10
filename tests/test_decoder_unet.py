"""The Kandinsky 2.2 decoder UNet (minidiff/models/unet_kandinsky.py) against diffusers.

What is compared:
  - Parity: tiny random diffusers UNets with every option kandinsky-2-2-decoder/unet sets (resnet
    up/down-sampling, added-KV attention, scale-shift time conditioning, image_proj context,
    the "image" added embedding, 8 output channels) are written by diffusers' save_pretrained
    and loaded through minidiff's production loader (`from_pretrained`, strict). Both run the same
    latents, timesteps and image embeddings; we compare `.sample`. Two models: the reference
    builder's (2 levels, 8x8 latents) and a 3-level one built here (layers_per_block 2, 16x16
    latents: more up/down resnets, skip concatenations of three widths, a second image width).
  - The official config on the meta device: the same state_dict keys and shapes (1.25 B parameters).
  - Round trip: minidiff's save_pretrained, read back by diffusers, gives diffusers' own output.
  - Bad input and unsupported options: InputError with a sentence naming the problem.

Tolerances (relative to the output's max |value|, tests/helpers.py):
  fp32 1e-5: both sides do the same operations; only the summation order of the attention
    differs ("math" vs diffusers' SDPA). Measured <= 6.9e-7 over 3 seeds, both models, both
    backends, all timestep kinds.
  bf16 4e-2 and at most twice diffusers' own bf16 error, both against the fp32 reference: bf16
    keeps 8 significant bits (unit roundoff 3.9e-3), and ~30 rounded layers put the output
    1-2% off for diffusers' bf16 model as much as for ours (measured 8.6e-3 .. 1.6e-2 for both;
    our / diffusers' error at most 1.16).
"""

import json
import math
import shutil

import pytest
import torch

from helpers import assert_rel_close, max_rel_err
from minidiff.data import config_folder
from minidiff.errors import InputError
from minidiff.models.attention import attention_backend, set_attention_slice
from minidiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from minidiff.reference import tiny_decoder_unet

diffusers = pytest.importorskip("diffusers")

FP32_RTOL = 1e-5  # see the module docstring
BF16_RTOL = 4e-2

THREE_LEVEL = dict(
    sample_size=16, in_channels=4, out_channels=8, layers_per_block=2, block_out_channels=(32, 64, 64),
    norm_num_groups=8, attention_head_dim=16,  # 2 and 4 heads of 16 channels
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=48,
    encoder_hid_dim=24, encoder_hid_dim_type="image_proj", addition_embed_type="image",
    resnet_time_scale_shift="scale_shift",
)
OFFICIAL = config_folder("kandinsky-2-2-decoder") / "unet" / "config.json"


def three_level_unet(seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**THREE_LEVEL)
    with torch.no_grad():  # norms and biases away from 1 / 0, as the reference builder does
        for p in unet.parameters():
            if p.dim() < 2:
                p.add_(0.2 * torch.randn_like(p))
    return unet.eval()


# name: (diffusers model, latent size, image embedding width)
MODELS = {
    "two-level": lambda: (tiny_decoder_unet(seed=0, image_embed_dim=32, sample_size=8), 8, 32),
    "three-level": lambda: (three_level_unet(), 16, 24),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (diffusers model, folder written by its save_pretrained, latent size, width)}."""
    out = {}
    for name, build in MODELS.items():
        ref, size, width = build()
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        out[name] = (ref, folder, size, width)
    return out


def inputs(size: int, width: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 4, size, size, generator=g)
    image_embeds = torch.randn(batch, width, generator=g)
    return x_t, {"image_embeds": image_embeds}


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_diffusers_fp32(checkpoints, name, backend):
    ref, folder, size, width = checkpoints[name]
    unet = UNet2DConditionModel.from_pretrained(folder)
    x_t, cond = inputs(size, width)
    timesteps = {
        "int": 981,
        "float": 500.5,
        "0-d tensor": torch.tensor(261),
        "(B,) tensor": torch.tensor([1, 999]),  # a different t per sample
    }
    with torch.no_grad():
        for what, t in timesteps.items():
            want = ref(x_t, t, None, added_cond_kwargs=cond).sample
            assert want.shape == (2, 8, size, size)  # eps and the variance interpolation v
            with attention_backend(backend):
                got = unet(x_t, t, None, added_cond_kwargs=cond).sample
            assert_rel_close(got, want, FP32_RTOL, f"{name} {backend} timestep {what}")
        # Negative controls: a per-sample timestep is per sample, and the image embedding matters.
        same_t = ref(x_t, 1, None, added_cond_kwargs=cond).sample
        assert max_rel_err(unet(x_t, torch.tensor([1, 999]), None, added_cond_kwargs=cond).sample[1], same_t[1]) > 1e-3
        other = {"image_embeds": cond["image_embeds"].flip(0)}
        assert max_rel_err(unet(x_t, 1, None, added_cond_kwargs=other).sample, same_t) > 1e-3


def test_encoder_hidden_states_are_replaced_as_in_diffusers(checkpoints):
    """With encoder_hid_dim_type="image_proj" diffusers overwrites encoder_hidden_states with the
    projected image embedding, so what is passed there changes nothing; minidiff does the same."""
    ref, folder, size, width = checkpoints["two-level"]
    unet = UNet2DConditionModel.from_pretrained(folder)
    x_t, cond = inputs(size, width)
    text = torch.randn(2, 7, ref.config.cross_attention_dim)
    with torch.no_grad():
        want = ref(x_t, 400, None, added_cond_kwargs=cond).sample
        assert torch.equal(ref(x_t, 400, text, added_cond_kwargs=cond).sample, want)  # diffusers ignores it
        got = unet(x_t, 400, None, added_cond_kwargs=cond).sample
        assert torch.equal(unet(x_t, 400, text, added_cond_kwargs=cond).sample, got)
        assert torch.equal(unet(x_t, 400, added_cond_kwargs=cond).sample, got)  # it may be left out
        assert_rel_close(got, want, FP32_RTOL, "encoder_hidden_states=None")


def test_attention_slicing_gives_the_same_output(checkpoints):
    ref, folder, size, width = checkpoints["three-level"]
    unet = UNet2DConditionModel.from_pretrained(folder)
    x_t, cond = inputs(size, width)
    with torch.no_grad(), attention_backend("math"):
        want = ref(x_t, 600, None, added_cond_kwargs=cond).sample
        set_attention_slice(unet, "max")  # one (sample, head) pair per call
        assert unet.mid_block.attentions[0].slice_size == 1
        assert_rel_close(unet(x_t, 600, None, added_cond_kwargs=cond).sample, want, FP32_RTOL, "sliced")


def test_bf16_close_to_fp32_reference(checkpoints):
    for name in MODELS:
        ref, folder, size, width = checkpoints[name]
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        ref_bf16 = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
        x_t, cond = inputs(size, width)
        cond_bf16 = {"image_embeds": cond["image_embeds"].bfloat16()}
        with torch.no_grad():
            want = ref(x_t, 700, None, added_cond_kwargs=cond).sample
            diffusers_err = max_rel_err(ref_bf16(x_t.bfloat16(), 700, None, added_cond_kwargs=cond_bf16).sample, want)
            for backend in ("math", "sdpa"):
                with attention_backend(backend):
                    got = unet(x_t.bfloat16(), 700, None, added_cond_kwargs=cond_bf16).sample
                assert got.dtype == torch.bfloat16
                err = max_rel_err(got, want)
                assert err <= BF16_RTOL, f"{name} {backend}: bf16 error {err:.3e}"
                assert err <= 2 * diffusers_err, f"{name} {backend}: {err:.3e} vs diffusers' bf16 {diffusers_err:.3e}"


# ----------------------------------------------------------------------------------------------
# Official config, saving, config keys


def test_official_config_has_diffusers_keys_and_shapes():
    config = json.loads(OFFICIAL.read_text())
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(config)
        unet = UNet2DConditionModel.from_config(config)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(got.keys() - want.keys()) == [] and sorted(want.keys() - got.keys()) == []
    assert got == want
    assert abs(sum(math.prod(s) for s in got.values()) - 1.253e9) < 1e6  # 1,253,057,288
    # attention_head_dim = 64 is the head WIDTH in these blocks: 768 / 1152 / 1536 channels.
    heads = [(b.attentions[0].num_heads, b.attentions[0].head_dim) for b in unet.down_blocks[1:]]
    assert heads == [(12, 64), (18, 64), (24, 64)]
    assert unet.mid_block.attentions[0].num_heads == 24
    assert got["encoder_hid_proj.image_embeds.weight"] == (32 * 768, 1280)  # 32 context tokens
    assert got["add_embedding.image_proj.weight"] == (1536, 1280)
    assert got["down_blocks.0.downsamplers.0.time_emb_proj.weight"] == (2 * 384, 1536)  # scale and shift


def test_save_pretrained_round_trip_into_diffusers(checkpoints, tmp_path):
    ref, folder, size, width = checkpoints["three-level"]
    unet = UNet2DConditionModel.from_pretrained(folder)
    unet.save_pretrained(tmp_path)
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert back.config.encoder_hid_dim_type == "image_proj" and back.config.encoder_hid_dim == width
    assert back.config.addition_embed_type == "image" and back.config.resnet_time_scale_shift == "scale_shift"
    x_t, cond = inputs(size, width)
    with torch.no_grad():
        # Same weights, same diffusers code: bit-identical.
        assert torch.equal(back(x_t, 10, None, added_cond_kwargs=cond).sample,
                           ref(x_t, 10, None, added_cond_kwargs=cond).sample)
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    assert again.config == unet.config


def test_diffusers_config_keys_are_all_understood(checkpoints):
    """Every key of the decoder's config.json is a config field or a checked fixed option."""
    _, folder, _, _ = checkpoints["two-level"]
    for keys in (json.loads((folder / "config.json").read_text()), json.loads(OFFICIAL.read_text())):
        fields = set(UNet2DConditionConfig.__dataclass_fields__)
        ignored = set(UNet2DConditionModel.config_ignore)
        assert [k for k in keys if not k.startswith("_") and k not in fields | ignored] == []


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors(checkpoints):
    _, folder, size, width = checkpoints["two-level"]
    unet = UNet2DConditionModel.from_pretrained(folder)
    x_t, cond = inputs(size, width)
    e = cond["image_embeds"]
    for missing in (None, {}, {"text_embeds": e}):
        with pytest.raises(InputError, match=r"conditioned on an image embedding: pass added_cond_kwargs="
                                             r"\{'image_embeds': tensor of shape \(batch, 32\)\}"):
            unet(x_t, 1, None, added_cond_kwargs=missing)
    with pytest.raises(InputError, match=r"must have shape \(batch, 32\) for this UNet \(encoder_hid_dim\), got \(2, 24\)"):
        unet(x_t, 1, None, added_cond_kwargs={"image_embeds": e[:, :24]})
    with pytest.raises(InputError, match=r"must have shape \(batch, 32\).*got \(2, 1, 32\)"):
        unet(x_t, 1, None, added_cond_kwargs={"image_embeds": e[:, None]})
    with pytest.raises(InputError, match=r"Batch sizes differ: sample has 2, image_embeds 1"):
        unet(x_t, 1, None, added_cond_kwargs={"image_embeds": e[:1]})
    with pytest.raises(InputError, match="cast the inputs"):
        unet(x_t, 1, None, added_cond_kwargs={"image_embeds": e.double()})
    with pytest.raises(InputError, match="divisible by 2"):
        unet(torch.randn(2, 4, 8, 9), 1, None, added_cond_kwargs=cond)
    assert unet(x_t, 1, None, added_cond_kwargs=cond).sample.shape == (2, 8, size, size)


def test_sd_unet_without_text_says_so():
    """The other family still needs its text: a clear sentence instead of an AttributeError."""
    unet = UNet2DConditionModel(UNet2DConditionConfig(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ))
    with pytest.raises(InputError, match="encoder_hidden_states is required"):
        unet(torch.randn(1, 4, 16, 16), 1, None)


@pytest.mark.parametrize(
    "option, value",
    [
        ("down_block_types", ["ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"]),  # families do not mix
        ("up_block_types", ["CrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        ("resnet_time_scale_shift", "default"),
        ("addition_embed_type", "text"),
        ("encoder_hid_dim_type", "text_proj"),
        ("only_cross_attention", True),
        ("mid_block_only_cross_attention", True),
        ("cross_attention_norm", "layer_norm"),
        ("resnet_skip_time_act", True),
        ("resnet_out_scale_factor", 2.0),
        ("use_linear_projection", True),  # diffusers ignores it in these blocks: refused, not ignored
    ],
)
def test_unsupported_decoder_option_is_named(checkpoints, tmp_path, option, value):
    _, folder, _, _ = checkpoints["two-level"]
    config = json.loads((folder / "config.json").read_text())
    config[option] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(InputError, match=f"option {option}=.*Kandinsky 2.2 decoder UNet"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_decoder_config_checks():
    config = json.loads(OFFICIAL.read_text())
    with pytest.raises(InputError, match="needs encoder_hid_dim"):
        UNet2DConditionModel.from_config({**config, "encoder_hid_dim": None})
    with pytest.raises(InputError, match="attention_head_dim must be one integer"):
        UNet2DConditionModel.from_config({**config, "attention_head_dim": [64, 64, 64, 64]})
    with pytest.raises(InputError, match="384 channels cannot be split into attention heads of attention_head_dim = 256"):
        UNet2DConditionModel.from_config({**config, "attention_head_dim": 256})
    assert UNet2DConditionConfig(**THREE_LEVEL).num_heads_per_block() == [2, 4, 4]
