"""Parity of minidiff's AutoencoderKL with diffusers' AutoencoderKL.

Every test builds a tiny random diffusers VAE, saves it with diffusers' own `save_pretrained`
(the official layout), loads it through minidiff's production loader and compares outputs.
Two configs: two levels (one downsample) and three levels (two downsamples, non-square input),
so the asymmetric padding, the channel-changing shortcuts and layers_per_block + 1 decoder
resnets are all exercised.
"""

import json

import pytest
import torch

from minidiff.models.attention import attention_backend
from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from tests.helpers import assert_rel_close, max_rel_err

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    # (config, image height, image width)
    "2-level": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8), 32, 32),
    "3-level": (dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8), 24, 40),
}

# fp32: both sides run the same operations on the same weights; only summation orders differ.
# (diffusers hands the mid-block's second resnet a channels-last-strided view after its attention,
# so its GroupNorm and conv take another CPU kernel path; the "math" backend sums the softmax in
# another order than SDPA.) Measured: posterior mean <= 6.4e-7, decode <= 1.8e-6, forward <= 3.2e-6.
# 1e-5 leaves room for other CPUs and still fails on any wrong op, key or order.
FP32_RTOL = 1e-5


def make_reference(name: str):
    cfg, _, _ = CONFIGS[name]
    n = len(cfg["block_out_channels"])
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4, sample_size=32, **cfg,
    ).eval()
    # diffusers initialises every GroupNorm to weight 1, bias 0; perturb them so that a swapped
    # norm (norm1 vs norm2, group_norm vs conv_norm_out) changes the output.
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if "norm" in key:
                p.add_(0.2 * torch.randn_like(p))
    return ref


def make_reference_from(folder, dtype):
    return diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(diffusers reference, minidiff model loaded from its folder, a batch of 2 images, the folder)."""
    ref = make_reference(request.param)
    folder = tmp_path_factory.mktemp(f"vae-{request.param}")
    ref.save_pretrained(folder)
    ours = AutoencoderKL.from_pretrained(folder)
    _, H, W = CONFIGS[request.param]
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1  # batch of 2 in [-1, 1]
    return ref, ours, x, folder


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@torch.no_grad()
def test_parity_fp32(pair, backend):
    ref, ours, x, _ = pair
    q_ref = ref.encode(x).latent_dist
    with attention_backend(backend):
        q = ours.encode(x).latent_dist
        for what in ("mean", "logvar", "std", "var"):
            assert_rel_close(getattr(q, what), getattr(q_ref, what), FP32_RTOL, f"{backend} posterior {what}")
        assert_rel_close(q.mode(), q_ref.mode(), FP32_RTOL, "mode")
        assert_rel_close(q.kl(), q_ref.kl(), FP32_RTOL, "kl to N(0, I)")
        # The same generator seed must give the same sample: same noise, same reparameterisation.
        z = q.sample(torch.Generator().manual_seed(7))
        z_ref = q_ref.sample(torch.Generator().manual_seed(7))
        assert_rel_close(z, z_ref, FP32_RTOL, "posterior sample")
        assert_rel_close(ours.decode(z_ref).sample, ref.decode(z_ref).sample, FP32_RTOL, f"{backend} decode")
        assert_rel_close(ours(x).sample, ref(x).sample, FP32_RTOL, f"{backend} forward (mode)")
        y = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        y_ref = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        assert_rel_close(y, y_ref, FP32_RTOL, f"{backend} forward (sampled)")
    f = ours.downsample_factor
    assert z.shape == (2, 4, x.shape[2] // f, x.shape[3] // f)
    assert y.shape == x.shape


@torch.no_grad()
def test_kl_between_two_posteriors(pair):
    ref, ours, x, _ = pair
    q, p = ours.encode(x[:1]).latent_dist, ours.encode(x[1:]).latent_dist
    q_ref, p_ref = ref.encode(x[:1]).latent_dist, ref.encode(x[1:]).latent_dist
    assert_rel_close(q.kl(p), q_ref.kl(p_ref), FP32_RTOL, "kl(q || p)")


def test_logvar_is_clamped_like_ldm():
    # Random weights never reach the clamp, so feed extreme moments directly: the log-variance
    # must be clamped to [-30, 20] (LDM) so that std and var stay finite and non-zero.
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from minidiff.models.vae import DiagonalGaussian

    moments = torch.cat([torch.randn(2, 4, 3, 3), torch.linspace(-100, 100, 72).view(2, 4, 3, 3)], dim=1)
    q, q_ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert q.logvar.min() == -30 and q.logvar.max() == 20
    for what in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(q, what), getattr(q_ref, what)), what
    assert_rel_close(q.kl(), q_ref.kl(), FP32_RTOL, "kl with clamped logvar")


@torch.no_grad()
def test_batch_equals_one_image_at_a_time(pair):
    # What VAE slicing will rely on: each image's latent does not depend on the rest of the batch.
    _, ours, x, _ = pair
    whole = ours.encode(x).latent_dist.mean
    alone = torch.cat([ours.encode(xi[None]).latent_dist.mean for xi in x])
    assert_rel_close(alone, whole, FP32_RTOL, "encode per image vs batched")
    assert_rel_close(torch.cat([ours.decode(zi[None]).sample for zi in whole]), ours.decode(whole).sample, FP32_RTOL,
                     "decode per image vs batched")


@torch.no_grad()
def test_bf16_against_fp32_reference(pair):
    ref, _, x, folder = pair
    ours = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    expected = ref(x).sample
    err = max_rel_err(ours(x.bfloat16()).sample.float(), expected)
    # What bf16 costs in diffusers itself, on the same weights and input:
    ref_bf16 = make_reference_from(folder, torch.bfloat16)
    err_ref = max_rel_err(ref_bf16(x.bfloat16()).sample.float(), expected)
    # bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3); over 10-20 convolutions and
    # norms the reconstruction drifts by ten times that. Measured: minidiff 2.4e-2 / 3.9e-2
    # (2-level / 3-level), diffusers in bf16 2.4e-2 / 4.3e-2. The bound 8e-2 (2x the worst seen)
    # leaves room for other CPUs; the second check says minidiff's bf16 path is no worse than
    # diffusers' own, which a bf16-only bug (e.g. a norm left in bf16 where fp32 is needed) breaks.
    assert err <= 8e-2, f"bf16 vs fp32: max relative error {err:.3e}"
    assert err <= 2 * err_ref + 1e-3, f"bf16 error {err:.3e} much larger than diffusers' own {err_ref:.3e}"


@torch.no_grad()
def test_save_pretrained_round_trip(pair, tmp_path):
    ref, ours, x, _ = pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    back = make_reference_from(tmp_path, torch.float32)
    def plain(cfg):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not k.startswith("_")}
    assert plain(back.config) == plain(ref.config)
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert ref_state.keys() == back_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], back_state[k]), k
    # Same weights and same code: bit-identical outputs.
    assert torch.equal(back(x).sample, ref(x).sample)


def _rewrite_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_wrong_checkpoint_lists_mismatched_keys(tmp_path):
    make_reference("2-level").save_pretrained(tmp_path)
    _rewrite_config(tmp_path, latent_channels=8)
    with pytest.raises(ValueError) as err:
        AutoencoderKL.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "wrong shape" in msg
    for key in ("encoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                "decoder.conv_in.weight"):
        assert key in msg, key

    _rewrite_config(tmp_path, latent_channels=4, mid_block_add_attention=False)
    with pytest.raises(ValueError, match="unexpected") as err:
        AutoencoderKL.from_pretrained(tmp_path)
    assert "encoder.mid_block.attentions.0.to_q.weight" in str(err.value)


def test_bad_input_sizes():
    model = AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3))
    with pytest.raises(ValueError, match=r"multiples of 4 = 2\*\*\(len\(block_out_channels\) - 1\)"):
        model.encode(torch.zeros(1, 3, 30, 32)).latent_dist
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.zeros(1, 3, 32, 34)).latent_dist
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 4, 32, 32)).latent_dist
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(3, 32, 32)).latent_dist
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 8, 8)).sample


@pytest.mark.parametrize("change, option", [
    (dict(down_block_types=("AttnDownEncoderBlock2D",)), "down_block_types"),
    (dict(up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")), "up_block_types"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(block_out_channels=(48,)), "norm_num_groups"),
])
def test_unsupported_config_is_rejected(change, option):
    with pytest.raises(ValueError, match=option):
        AutoencoderKL.from_config(change)


# The vae/config.json of SD 1.5 (sample_size 512) and SD 2.1 (sample_size 768).
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.mark.parametrize("sample_size", [512, 768])
def test_full_size_sd_config_on_meta(sample_size):
    config = {**SD_VAE_CONFIG, "sample_size": sample_size}
    with torch.device("meta"):
        ours = AutoencoderKL.from_config(config)
        ref = diffusers.AutoencoderKL.from_config(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes.keys() == ref_shapes.keys(), sorted(ours_shapes.keys() ^ ref_shapes.keys())
    assert ours_shapes == ref_shapes
    assert ours.downsample_factor == 8
    assert ours.config.scaling_factor == 0.18215
    # 83.65M parameters, the published size of the SD VAE.
    assert sum(v.numel() for v in ours.state_dict().values()) == 83_653_863
