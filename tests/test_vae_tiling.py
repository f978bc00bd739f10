"""VAE slicing and tiling against diffusers' enable_slicing() / enable_tiling().

A tiny random diffusers AutoencoderKL with sample_size 32 (so a 32-pixel tile, and 0.25 overlap)
is saved in the official layout and loaded by minidiff; both then encode 96x80 images and decode
the matching latents with tiling on, so there are 4 x 4 overlapping tiles whose last row and
column are cut short by the border. Two configs: f = 2 (latent tile 16) and f = 4 (latent tile 8).
"""

import pytest
import torch

from minidiff.models.vae import AutoencoderKL
from minidiff.pipelines.text_to_image import StableDiffusionPipeline
from minidiff.reference import save_tiny_pipeline
from tests.helpers import assert_rel_close, max_rel_err

diffusers = pytest.importorskip("diffusers")

# fp32, same weights, same tiles, same blend order: only summation order inside the kernels
# differs (measured <= 2e-6 relative on decode, <= 5e-7 on the posterior mean); the bar
# is 1e-5. A wrong tile size, stride, blend ramp or blend order moves values by > 1e-2.
RTOL = 1e-5
H, W = 96, 80

CONFIGS = {
    "f2": dict(block_out_channels=(16, 32), layers_per_block=1),
    "f4": dict(block_out_channels=(16, 32, 32), layers_per_block=1),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def built(request, tmp_path_factory):
    """(diffusers VAE, minidiff VAE loaded from its folder, images (2, 3, H, W), latents)."""
    cfg = CONFIGS[request.param]
    n = len(cfg["block_out_channels"])
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4, norm_num_groups=8, sample_size=32, **cfg).eval()
    with torch.no_grad():  # GroupNorms start at (1, 0): perturb them so a misplaced norm shows
        for key, p in ref.named_parameters():
            if "norm" in key:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(f"vae-tiling-{request.param}")
    ref.save_pretrained(folder)
    ours = AutoencoderKL.from_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, H, W, generator=gen) * 2 - 1
    f = ours.downsample_factor
    z = torch.randn(2, 4, H // f, W // f, generator=gen)
    return ref, ours, x, z


@pytest.fixture
def pair(built):
    """`built`, with every switch turned off again after the test."""
    yield built
    for vae in built[:2]:
        vae.disable_tiling()
        vae.disable_slicing()


def test_tile_sizes_follow_diffusers(pair):
    ref, ours, _, _ = pair
    assert ours.tile_sample_min_size == ref.tile_sample_min_size == 32
    assert ours.tile_latent_min_size == ref.tile_latent_min_size
    assert ours.tile_overlap_factor == ref.tile_overlap_factor == 0.25


@pytest.mark.parametrize("slicing", [False, True])
@torch.no_grad()
def test_tiled_encode_matches_diffusers(pair, slicing):
    ref, ours, x, _ = pair
    ref.enable_tiling(), ours.enable_tiling()
    if slicing:
        ref.enable_slicing(), ours.enable_slicing()
    a, b = ours.encode(x).latent_dist, ref.encode(x).latent_dist
    assert_rel_close(a.mean, b.mean, RTOL, "tiled posterior mean")
    assert_rel_close(a.std, b.std, RTOL, "tiled posterior std")
    # Control: tiling really happened (the tiles' GroupNorms and attention see only one tile).
    ours.disable_tiling()
    assert max_rel_err(ours.encode(x).latent_dist.mean, a.mean) > 1e-2


@pytest.mark.parametrize("slicing", [False, True])
@torch.no_grad()
def test_tiled_decode_matches_diffusers(pair, slicing):
    ref, ours, _, z = pair
    ref.enable_tiling(), ours.enable_tiling()
    if slicing:
        ref.enable_slicing(), ours.enable_slicing()
    a, b = ours.decode(z).sample, ref.decode(z).sample
    assert a.shape == (2, 3, H, W)
    assert_rel_close(a, b, RTOL, "tiled decode")
    ours.disable_tiling()
    assert max_rel_err(ours.decode(z).sample, a) > 1e-2


@torch.no_grad()
def test_slicing_matches_diffusers_and_the_whole_batch(pair):
    ref, ours, x, z = pair
    whole_enc, whole_dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    ref.enable_slicing(), ours.enable_slicing()
    sliced_enc, sliced_dec = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    assert_rel_close(sliced_enc, ref.encode(x).latent_dist.mean, RTOL, "sliced encode")
    assert_rel_close(sliced_dec, ref.decode(z).sample, RTOL, "sliced decode")
    # Slicing is exact up to summation order: every op acts on each image separately.
    assert_rel_close(sliced_enc, whole_enc, RTOL, "sliced vs whole encode")
    assert_rel_close(sliced_dec, whole_dec, RTOL, "sliced vs whole decode")


@torch.no_grad()
def test_small_inputs_are_not_tiled(pair):
    _, ours, x, z = pair
    f = ours.downsample_factor
    small_x, small_z = x[:, :, :32, :32], z[:, :, :32 // f, :32 // f]
    plain = ours.encode(small_x).latent_dist.mean, ours.decode(small_z).sample
    ours.enable_tiling()
    assert torch.equal(ours.encode(small_x).latent_dist.mean, plain[0])
    assert torch.equal(ours.decode(small_z).sample, plain[1])


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("tiny-tiling"), flavour="sd1")
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def test_pipeline_switches(pipes):
    """The pipeline's switches reach decode_latents: a 96x96 image from the tiny pipeline (VAE
    sample_size 64, so 4 tiles) matches diffusers' pipeline with its VAE tiled; slicing a batch of
    two matches too; disable_* turns them off."""
    ours, ref = pipes
    ours.enable_vae_tiling()
    ours.enable_vae_slicing()
    ref.vae.enable_tiling()
    ref.vae.enable_slicing()
    assert ours.vae.use_tiling and ours.vae.use_slicing
    kw = dict(prompt=["a red circle", "a blue square"], num_inference_steps=2, height=96, width=96, output_type="np")
    try:
        a = ours(generator=torch.Generator().manual_seed(0), **kw).images
        b = ref(generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        ref.vae.disable_tiling()
        ref.vae.disable_slicing()
    assert a.shape == (2, 96, 96, 3)
    # Images in [0, 1]; the UNet steps agree to ~1e-6 (see test_text_to_image.py), the tiled
    # decode to ~1e-6: 1e-4 absolute as in the text-to-image parity test.
    assert abs(a - b).max() <= 1e-4
    latents = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(2))
    tiled = ours.decode_latents(latents)
    ours.disable_vae_tiling()
    ours.disable_vae_slicing()
    assert not ours.vae.use_tiling and not ours.vae.use_slicing
    assert max_rel_err(ours.decode_latents(latents), tiled) > 1e-2  # tiling was on, now it is off
