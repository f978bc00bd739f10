"""DiffEdit end to end: a tiny random SD checkpoint written by diffusers/transformers, loaded by
diffusers' StableDiffusionDiffEditPipeline and by minidiff's DiffEditPipeline; the same seeds
must give the same masks, inverted latents and edited images. Then minidiff's own options
(aligned blend, per-image clamp, shared negative branch, the soft maps) and every bad-input error.
The module docstring of minidiff/pipelines/diffedit.py lists where diffusers differs; the tests
below named after those differences show each."""

import numpy as np
import pytest
import torch

from minidiff.pipelines.diffedit import DiffEditPipeline, InversionOutput
from minidiff.reference import save_tiny_pipeline
from tests.helpers import max_rel_err

# Tolerance. Both sides do the same float32 arithmetic, but diffusers' VAE hands back latents in
# channels-last memory layout, so the UNet's convolutions pick other kernels and round
# differently (1.8e-6 at the first UNet output for bit-identical values; measured with diffusers'
# own UNet/VAE/text encoder/schedulers swapped into minidiff's pipeline). The random tiny UNet
# amplifies such rounding, guidance 7.5 more so: measured 1e-6 (guidance 1) to 6e-5 (batch 2,
# 3 steps, guidance 7.5); 20 full-strength steps at guidance 7.5 reach 1.1e-4, so that case is
# not in the list. A real mistake (off-by-one blend, wrong timestep or guidance) moves latents by
# > 1e-2. Masks are binary and must be identical.
RTOL = 1e-4
SIZE = 32  # pixels; the tiny VAE has f = 2, so latents are 16x16 (the regulariser's pyramid has 2 levels)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def load_both(folder):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    ref = StableDiffusionDiffEditPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
        inverse_scheduler=DDIMInverseScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
    ref.set_progress_bar_config(disable=True)
    ours = DiffEditPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    assert ours.vae_scale_factor == ref.vae_scale_factor == 2
    return ours, ref


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return load_both(save_tiny_pipeline(tmp_path_factory.mktemp("tiny-diffedit")))


@pytest.fixture(scope="module")
def images():
    """Two unrelated images (B, H, W, 3) in [0, 1]: smooth colour ramps plus noise, and noise."""
    rs = np.random.RandomState(0)
    ramp = np.linspace(0, 1, SIZE, dtype=np.float32)
    a = np.stack([ramp[None, :].repeat(SIZE, 0), ramp[:, None].repeat(SIZE, 1), np.full((SIZE, SIZE), 0.3)], -1)
    a = np.clip(a + 0.1 * rs.randn(SIZE, SIZE, 3), 0, 1)
    b = rs.rand(SIZE, SIZE, 3)
    return np.stack([a, b]).astype(np.float32)


SRC, TGT = ["a cat", "a house"], ["a dog", "a tree"]

CASES = [
    dict(batch=1, num_inference_steps=3, inpaint_strength=0.8, guidance_scale=7.5, num_maps_per_mask=10,
         mask_encode_strength=0.5),
    dict(batch=1, num_inference_steps=20, inpaint_strength=0.3, guidance_scale=1.0, num_maps_per_mask=1,
         mask_encode_strength=0.3),
    dict(batch=2, num_inference_steps=3, inpaint_strength=1.0, guidance_scale=7.5, num_maps_per_mask=10,
         mask_encode_strength=1.0),
    dict(batch=2, num_inference_steps=20, inpaint_strength=0.3, guidance_scale=7.5, num_maps_per_mask=1,
         mask_encode_strength=0.8),
    dict(batch=1, num_inference_steps=20, inpaint_strength=1.0, guidance_scale=1.0, num_maps_per_mask=10,
         mask_encode_strength=0.5, eta=0.5),
    dict(batch=2, num_inference_steps=3, inpaint_strength=0.8, guidance_scale=7.5, num_maps_per_mask=10,
         mask_encode_strength=0.5, num_reg_steps=1),
    dict(batch=2, num_inference_steps=20, inpaint_strength=0.8, guidance_scale=1.0, num_maps_per_mask=1,
         mask_encode_strength=0.5, num_reg_steps=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_mask_inversion_and_edit_match_diffusers(pipes, images, case):
    ours, ref = pipes
    case = dict(case)
    B = case.pop("batch")
    maps = case.pop("num_maps_per_mask")
    mask_strength = case.pop("mask_encode_strength")
    eta = case.pop("eta", 0.0)
    reg = dict(num_reg_steps=case.pop("num_reg_steps", 0))
    img, src, tgt = images[:B], SRC[:B], TGT[:B]

    # Step 1. diffusers' generate_mask crashes for guidance_scale <= 1, so the mask always uses 7.5.
    mkw = dict(image=img, source_prompt=src, target_prompt=tgt, num_maps_per_mask=maps,
               num_inference_steps=case["num_inference_steps"], mask_encode_strength=mask_strength)
    mask = ours.generate_mask(generator=gen(1), **mkw)
    mask_ref = ref.generate_mask(generator=gen(1), **mkw)
    assert mask.dtype == mask_ref.dtype and mask.shape == (B, SIZE // 2, SIZE // 2)
    assert np.array_equal(mask, mask_ref)
    assert 0 < mask.mean() < 1, "a trivial mask would not test the blend"

    # Step 2. decode_latents also checks the decoded trajectory.
    ikw = dict(image=img, prompt=src, decode_latents=True, output_type="np", **case, **reg)
    inv = ours.invert(generator=gen(2), **ikw)
    inv_ref = ref.invert(generator=gen(2), **ikw)
    assert inv.latents.shape == inv_ref.latents.shape
    assert max_rel_err(inv.latents, inv_ref.latents) < RTOL
    assert np.abs(inv.images - inv_ref.images).max() < RTOL  # images in [0, 1]: absolute = relative

    # Step 3 (blend="diffusers", the default).
    ckw = dict(prompt=tgt, negative_prompt=src, output_type="np", eta=eta, **case)
    out = ours(mask_image=mask, image_latents=inv, generator=gen(3), **ckw).images
    out_ref = ref(mask_image=mask_ref, image_latents=inv_ref.latents, generator=gen(3), **ckw).images
    assert out.shape == out_ref.shape == (B, SIZE, SIZE, 3)
    assert np.abs(out - out_ref).max() < RTOL


@pytest.mark.parametrize("case", [
    dict(batch=1, num_inference_steps=3, guidance_scale=7.5, num_reg_steps=0),
    # diffusers' regulariser converts v to eps with the CFG-doubled latents (wrong, or a shape
    # error); without guidance its conversion is right, and so is ours.
    dict(batch=2, num_inference_steps=10, guidance_scale=1.0, num_reg_steps=1),
], ids=["cfg", "regulariser"])
def test_v_prediction_matches_diffusers(tmp_path_factory, images, case):
    """The "sd2" tiny flavour: v-prediction, linear projections, a head count per block."""
    ours, ref = load_both(save_tiny_pipeline(tmp_path_factory.mktemp("tiny-diffedit-v"), flavour="sd2"))
    case = dict(case)
    B = case.pop("batch")
    img, src, tgt = images[:B], SRC[:B], TGT[:B]
    mkw = dict(image=img, source_prompt=src, target_prompt=tgt, num_maps_per_mask=3,
               num_inference_steps=case["num_inference_steps"])
    mask = ours.generate_mask(generator=gen(1), **mkw)
    assert np.array_equal(mask, ref.generate_mask(generator=gen(1), **mkw)) and 0 < mask.mean() < 1
    inv = ours.invert(image=img, prompt=src, generator=gen(2), **case)
    inv_ref = ref.invert(image=img, prompt=src, generator=gen(2), **case)
    assert max_rel_err(inv.latents, inv_ref.latents) < RTOL
    case.pop("num_reg_steps")
    out = ours(prompt=tgt, mask_image=mask, image_latents=inv, output_type="np", **case).images
    out_ref = ref(prompt=tgt, mask_image=mask, image_latents=inv_ref.latents, output_type="np", **case).images
    assert np.abs(out - out_ref).max() < RTOL


def test_long_prompt_is_truncated_with_a_warning(pipes, images):
    ours, ref = pipes
    prompt = "a photo of a small striped cat " * 15  # ~105 tokens > 77
    with pytest.warns(UserWarning, match="were dropped"):
        inv = ours.invert(image=images[:1], prompt=prompt, num_inference_steps=3, generator=gen())
    inv_ref = ref.invert(image=images[:1], prompt=prompt, num_inference_steps=3, generator=gen())
    assert max_rel_err(inv.latents, inv_ref.latents) < RTOL


# ----------------------------------------------------------------------------------------------
# The mask: guidance, shared negative branch, clamp modes, PIL output

MASK_KW = dict(source_prompt="a cat", target_prompt="a dog", num_maps_per_mask=4, num_inference_steps=10)


def test_shared_negative_branch_equals_four_groups(pipes, images):
    ours, _ = pipes
    shortcut = ours.generate_mask(image=images, generator=gen(), **MASK_KW)
    four_groups = ours.generate_mask(image=images, generator=gen(), skip_shared_negative=False, **MASK_KW)
    assert np.array_equal(shortcut, four_groups) and 0 < shortcut.mean() < 1


def test_mask_maps_are_what_the_mask_is_cut_from(pipes, images):
    """return_maps=True gives the maps generate_mask binarises (notebook 06 plots them)."""
    ours, _ = pipes
    maps = ours.generate_mask(image=images, generator=gen(), return_maps=True, **MASK_KW)
    mask = ours.generate_mask(image=images, generator=gen(), **MASK_KW)
    assert np.array_equal(maps.mask, mask)
    assert maps.differences.shape == (2, 4, SIZE // 2, SIZE // 2)  # (B, K, h, w), K = num_maps_per_mask
    assert np.array_equal((maps.soft_mask > 0.5).long().numpy(), mask)
    # The mean of the K maps vs the joint mean over (K, channels): the same up to float32 summation order.
    torch.testing.assert_close(maps.differences.mean(dim=1), maps.guidance_map, rtol=1e-5, atol=0)
    assert 0 <= maps.soft_mask.min() and maps.soft_mask.max() <= 1 and maps.bound.ndim == 0  # mask_clamp="batch"
    assert maps.timestep == int(ours.scheduler.timesteps[10 - 5])  # mask_encode_strength 0.5 of 10 steps


def test_mask_guidance_cancels_with_shared_negative(pipes, images):
    """With the same negative for source and target, the map is g |eps(Q) - eps(R)| and the
    normalisation removes g: guidance 1 (which crashes diffusers) gives diffusers' 7.5 mask."""
    ours, ref = pipes
    at_one = ours.generate_mask(image=images, guidance_scale=1.0, generator=gen(), **MASK_KW)
    kw = {**MASK_KW, "source_prompt": ["a cat"] * 2, "target_prompt": ["a dog"] * 2}  # diffusers: one per image
    ref_at_7 = ref.generate_mask(image=images, guidance_scale=7.5, generator=gen(), **kw)
    assert np.array_equal(at_one, ref_at_7)


def test_different_negatives_reproduce_diffusers_swapped_guidance(pipes, images):
    """diffusers' generate_mask swaps prompt and negative prompt (it unpacks encode_prompt's
    result the wrong way round). With different negatives that changes the mask: diffusers'
    equals ours with each prompt exchanged with its negative."""
    ours, ref = pipes
    kw = dict(image=images, num_maps_per_mask=4, num_inference_steps=10, guidance_scale=3.0)
    ref_mask = ref.generate_mask(source_prompt=["a cat"] * 2, source_negative_prompt=["blurry"] * 2,
                                 target_prompt=["a dog"] * 2, target_negative_prompt=["a drawing"] * 2,
                                 generator=gen(), **kw)
    swapped = ours.generate_mask(source_prompt="blurry", source_negative_prompt="a cat",
                                 target_prompt="a drawing", target_negative_prompt="a dog", generator=gen(), **kw)
    correct = ours.generate_mask(source_prompt="a cat", source_negative_prompt="blurry",
                                 target_prompt="a dog", target_negative_prompt="a drawing", generator=gen(), **kw)
    assert np.array_equal(swapped, ref_mask)
    assert not np.array_equal(correct, ref_mask)  # the quirk is real, and we do not copy it


def test_same_source_and_target_gives_an_empty_mask(pipes, images):
    """Nothing to edit: the map is 0 everywhere. (diffusers divides 0 by 0 and returns all ones.)"""
    ours, _ = pipes
    mask = ours.generate_mask(image=images, generator=gen(), **{**MASK_KW, "target_prompt": "a cat"})
    assert mask.shape == (2, SIZE // 2, SIZE // 2) and mask.max() == 0


def test_per_image_clamp(pipes, images):
    ours, _ = pipes
    one = images[:1]
    assert np.array_equal(ours.generate_mask(image=one, mask_clamp="per_image", generator=gen(), **MASK_KW),
                          ours.generate_mask(image=one, mask_clamp="batch", generator=gen(), **MASK_KW))
    # Per image, a mask does not depend on its batch-mates (one generator per image).
    both = ours.generate_mask(image=images, mask_clamp="per_image", generator=[gen(1), gen(2)], **MASK_KW)
    alone = [ours.generate_mask(image=images[i:i + 1], generator=[gen(i + 1)], **MASK_KW)[0] for i in range(2)]
    assert np.array_equal(both, np.stack(alone))
    batch_wide = ours.generate_mask(image=images, mask_clamp="batch", generator=[gen(1), gen(2)], **MASK_KW)
    assert not np.array_equal(both, batch_wide)  # these two images have different mean maps


def test_pil_mask_feeds_the_edit(pipes, images):
    ours, _ = pipes
    as_np = ours.generate_mask(image=images, generator=gen(), **MASK_KW)
    as_pil = ours.generate_mask(image=images, generator=gen(), output_type="pil", **MASK_KW)
    assert len(as_pil) == 2 and as_pil[0].mode == "L" and as_pil[0].size == (SIZE // 2, SIZE // 2)
    assert np.array_equal(np.stack([np.asarray(m) for m in as_pil]) // 255, as_np)
    inv = ours.invert(image=images, prompt="a cat", num_inference_steps=3, generator=gen())
    kw = dict(prompt="a dog", image_latents=inv, num_inference_steps=3, output_type="latent")
    assert torch.equal(ours(mask_image=as_pil, **kw).images, ours(mask_image=as_np, **kw).images)


def test_one_prompt_for_a_batch(pipes, images):
    ours, _ = pipes
    kw = dict(image=images, num_inference_steps=3)
    a = ours.invert(prompt="a cat", generator=gen(), **kw).latents
    b = ours.invert(prompt=["a cat", "a cat"], generator=gen(), **kw).latents
    assert torch.equal(a, b)


def test_num_images_per_prompt_keeps_masks_with_their_images(pipes, images):
    """Copies of an image stay adjacent, with their own mask (diffusers tiles the masks instead,
    so for a batch > 1 its masks and latents disagree). With eta = 0 DDIM is deterministic, so
    the copies equal the single edit."""
    ours, _ = pipes
    inv = ours.invert(image=images, prompt="a cat", num_inference_steps=3, generator=gen())
    mask = np.zeros((2, SIZE // 2, SIZE // 2), dtype=np.int64)
    mask[0, :8], mask[1, 8:] = 1, 1
    kw = dict(prompt="a dog", mask_image=mask, image_latents=inv, num_inference_steps=3, output_type="latent")
    one = ours(**kw).images
    two = ours(num_images_per_prompt=2, **kw).images
    assert two.shape == (4, 4, SIZE // 2, SIZE // 2)
    # Batch 4 vs 2 rounds differently (1e-5 measured); a mask paired with the wrong image moves latents by O(1).
    torch.testing.assert_close(two, one.repeat_interleave(2, dim=0), rtol=0, atol=RTOL)


# ----------------------------------------------------------------------------------------------
# The blend


def test_aligned_blend_restores_the_unmasked_region(pipes, images):
    ours, _ = pipes
    mask = ours.generate_mask(image=images, generator=gen(), **MASK_KW)
    inv = ours.invert(image=images, prompt="a cat", num_inference_steps=5, inpaint_strength=0.8, generator=gen())
    keep = torch.from_numpy(1 - mask).float()[:, None]  # (B, 1, h, w): 1 outside the mask
    seen = []
    kw = dict(prompt="a dog", mask_image=mask, image_latents=inv, num_inference_steps=5, inpaint_strength=0.8,
              output_type="latent")
    aligned = ours(blend="aligned", callback=lambda i, t, x, eps: seen.append(x.clone()), **kw).images
    default = ours(blend="diffusers", **kw).images
    S = inv.latents.shape[1]
    assert len(seen) == S == 4
    # After step i the background is the inverted latent at the level just reached ...
    for i in range(S - 1):
        assert torch.equal(seen[i] * keep, inv.latents[:, i + 1] * keep)
    # ... and at the end the clean latent x_0, exactly.
    assert torch.equal(aligned * keep, inv.clean_latents * keep)
    # diffusers' blend keeps the inverted latent one step noisier (x at t_1), not x_0.
    assert torch.equal(default * keep, inv.latents[:, -1] * keep)
    assert (default * keep - inv.clean_latents * keep).abs().max() > 1e-3
    inside = torch.from_numpy(mask).bool()[:, None].expand_as(aligned)
    assert not torch.equal(aligned[inside], default[inside])  # the masked region differs too


def test_recommended_settings_leave_the_method_defaults_alone(pipes, images):
    """A folder's recommended_settings.json (pipelines/settings.py) is for the command and the
    caller to read: with the shapes model's settings attached, every method called without
    settings still runs diffusers' defaults (the same mask as diffusers', the same latents as
    with no settings attached)."""
    from pathlib import Path

    from minidiff.pipelines.settings import recommended_settings

    ours, ref = pipes
    shapes = recommended_settings(Path(__file__).resolve().parents[1] / "weights" / "shapes")
    assert shapes["diffedit"]["mask_encode_strength"] != 0.5  # else this would show nothing

    def run():
        mask = ours.generate_mask(image=images[:1], source_prompt="a cat", target_prompt="a dog", generator=gen())
        inv = ours.invert(image=images[:1], prompt="a cat", generator=gen())
        return mask, inv.latents, ours(prompt="a dog", mask_image=mask, image_latents=inv, output_type="latent").images

    ours.recommended_settings = shapes
    try:
        with_settings = run()
    finally:
        ours.recommended_settings = {}
    without = run()
    for a, b in zip(with_settings, without):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    theirs = ref.generate_mask(image=images[:1], source_prompt="a cat", target_prompt="a dog", generator=gen())
    assert np.array_equal(with_settings[0], theirs)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear ValueError each


@pytest.fixture(scope="module")
def edit_inputs(pipes, images):
    ours, _ = pipes
    inv = ours.invert(image=images, prompt="a cat", num_inference_steps=3, inpaint_strength=0.8, generator=gen())
    mask = np.ones((2, SIZE // 2, SIZE // 2), dtype=np.int64)
    return inv, mask


def test_bad_images_prompts_and_numbers(pipes, images):
    ours, _ = pipes
    kw = dict(source_prompt="a cat", target_prompt="a dog", num_inference_steps=3)
    with pytest.raises(ValueError, match="needs positive multiples of"):
        ours.generate_mask(image=np.zeros((30, 30, 3), np.float32), **kw)
    with pytest.raises(ValueError, match="needs positive multiples of"):
        ours.invert(image=np.zeros((34, 34, 3), np.float32), prompt="a cat", num_inference_steps=3)
    with pytest.raises(ValueError, match="mask_encode_strength"):
        ours.generate_mask(image=images, mask_encode_strength=1.5, **kw)
    with pytest.raises(ValueError, match="inpaint_strength"):
        ours.invert(image=images, prompt="a cat", inpaint_strength=-0.1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.invert(image=images, prompt="a cat", num_inference_steps=0)
    with pytest.raises(ValueError, match="0 steps"):
        ours.invert(image=images, prompt="a cat", num_inference_steps=3, inpaint_strength=0.2)
    with pytest.raises(ValueError, match="num_maps_per_mask"):
        ours.generate_mask(image=images, num_maps_per_mask=0, **kw)
    with pytest.raises(ValueError, match="mask_clamp"):
        ours.generate_mask(image=images, mask_clamp="image", **kw)
    with pytest.raises(ValueError, match=r"2 prompts for 1 image"):
        ours.invert(image=images[:1], prompt=["a cat", "a dog"], num_inference_steps=3)
    with pytest.raises(ValueError, match=r"2 target_prompts for 3 image"):
        ours.generate_mask(image=np.concatenate([images, images[:1]]), source_prompt="a cat",
                           target_prompt=["a dog", "a tree"], num_inference_steps=3)
    with pytest.raises(ValueError, match="`image` is required"):
        ours.invert(prompt="a cat")


def test_bad_masks_and_inverted_latents(pipes, edit_inputs):
    ours, _ = pipes
    inv, mask = edit_inputs
    kw = dict(prompt="a dog", num_inference_steps=3, inpaint_strength=0.8)
    with pytest.raises(ValueError, match="mask is 8x8 but the latents are 16x16"):
        ours(mask_image=np.ones((8, 8)), image_latents=inv, **kw)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ours(mask_image=mask * 2.0, image_latents=inv, **kw)
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        ours(mask_image=np.ones((3, 16, 16)), image_latents=inv, **kw)
    with pytest.raises(ValueError, match="inpaint_strength"):
        ours(mask_image=mask, image_latents=inv, prompt="a dog", inpaint_strength=1.2)
    with pytest.raises(ValueError, match="`mask_image` is required"):
        ours(image_latents=inv, **kw)
    with pytest.raises(ValueError, match="`image_latents` is required"):
        ours(mask_image=mask, **kw)
    with pytest.raises(ValueError, match="blend"):
        ours(mask_image=mask, image_latents=inv, blend="paper", **kw)
    # Inverted latents from other settings (diffusers: a shape error, issue 5465).
    with pytest.raises(ValueError, match="num_inference_steps=3, inpaint_strength=0.8.*num_inference_steps=4"):
        ours(mask_image=mask, image_latents=inv, prompt="a dog", num_inference_steps=4)
    with pytest.raises(ValueError, match="Pass the same num_inference_steps and inpaint_strength"):
        ours(mask_image=mask, image_latents=inv, prompt="a dog", num_inference_steps=3, inpaint_strength=0.4)
    with pytest.raises(ValueError, match="holds 2 inverted latents.*takes 3 steps"):
        ours(mask_image=mask, image_latents=inv.latents, prompt="a dog", num_inference_steps=3, inpaint_strength=1.0)
    with pytest.raises(ValueError, match="aligned"):
        ours(mask_image=mask, image_latents=inv.latents, blend="aligned", **kw)
    # A plain tensor from the right settings is accepted, as in diffusers.
    a = ours(mask_image=mask, image_latents=inv.latents, output_type="latent", **kw).images
    b = ours(mask_image=mask, image_latents=inv, output_type="latent", **kw).images
    assert torch.equal(a, b)


def test_inversion_output_is_self_describing(pipes, edit_inputs):
    inv, _ = edit_inputs
    assert isinstance(inv, InversionOutput)
    assert (inv.num_inference_steps, inv.inpaint_strength) == (3, 0.8)
    assert inv.latents.shape == (2, 2, 4, SIZE // 2, SIZE // 2) and inv.timesteps.tolist() == [334, 1]
    latents, images = inv  # diffusers' tuple order
    assert latents is inv.latents and images is None
