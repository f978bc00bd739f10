"""Parity of minidiff's Kandinsky 2.2 decoder and combined pipelines with diffusers' on the same folders.

diffusers writes a tiny random decoder folder (unet with every kandinsky-2-2-decoder option, movq
with spatial norms, kandinsky-2-2-decoder's DDPM scheduler config) and a tiny random prior folder;
both libraries load the same folders and run the same calls with identically seeded generators.

Tolerance. The comparisons run in float64 (both pipelines `.to(torch.float64)`, diffusers'
scheduler tables cast to float64 as tests/test_schedulers.py does): then both libraries do the
same arithmetic up to summation order, and whole images agree to ~1e-12 relative (measured
6.9e-12 of the largest value after 4 guided DDPM steps). RTOL 1e-9 (of the largest value) fails
on any wrong step, split, order or constant. In float32 the same run differs by up to 1e-3 of
values up to 27 (random tiny weights; at t = 991 the DDPM step divides by sqrt(alpha_bar) = 0.04,
so ulp-level UNet differences grow; measured 1.1e-4 relative), which is why float32 is
checked once, at 5e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiff.errors import InputError
from minidiff.reference import TEXT_HIDDEN, save_tiny_decoder_pipeline, save_tiny_prior_pipeline

diffusers = pytest.importorskip("diffusers")

RTOL = 1e-9  # float64, relative to the largest |value| (see the module docstring)
FP32_RTOL = 5e-4  # measured 1.1e-4 (see the module docstring)
STEPS = 4
SIZE = 32  # pixels; the tiny MoVQ halves once, so 16x16 latents (latent_size rounds to f**2 = 4 px)


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory):
    return save_tiny_decoder_pipeline(tmp_path_factory.mktemp("decoder"))


@pytest.fixture(scope="module")
def prior_folder(tmp_path_factory):
    return save_tiny_prior_pipeline(tmp_path_factory.mktemp("prior"))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def f64(pipe, reference: bool):
    """The pipeline in float64; for diffusers' also its schedulers' float32 tables."""
    pipe.to(torch.float64)
    if reference:
        for scheduler in [v for k, v in pipe.components.items() if k.endswith("scheduler")]:
            for name in ("alphas_cumprod", "alphas", "betas", "one", "final_alpha_cumprod"):
                if isinstance(getattr(scheduler, name, None), torch.Tensor):
                    setattr(scheduler, name, getattr(scheduler, name).double())
    return quiet(pipe)


def assert_close(a, b, rtol=RTOL):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)
    assert err <= rtol, f"max |a - b| / max |b| = {err:.3g} > {rtol:g}"


def embeds(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, TEXT_HIDDEN, generator=g, dtype=torch.float64),
            torch.randn(batch, TEXT_HIDDEN, generator=g, dtype=torch.float64))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run_both(folder, scheduler=None, **kw):
    from minidiff import KandinskyV22Pipeline

    ours = KandinskyV22Pipeline.from_pretrained(folder)
    ref = diffusers.KandinskyV22Pipeline.from_pretrained(folder)
    if scheduler is not None:  # both read the folder's scheduler_config.json (diffusers' from_config of
        # a DDPM config would drop set_alpha_to_one, a DDIM-only key the file sets)
        ours.scheduler = scheduler[0].from_pretrained(folder, subfolder="scheduler")
        ref.scheduler = scheduler[1].from_pretrained(folder, subfolder="scheduler")
    ours, ref = f64(ours, False), f64(ref, True)
    a = ours(**kw, generator=gen()).images
    b = ref(**kw, generator=gen()).images
    return a, b


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_decoder_matches_diffusers(decoder_folder, output_type):
    e, neg = embeds()
    a, b = run_both(decoder_folder, image_embeds=e, negative_image_embeds=neg, height=SIZE, width=SIZE,
                    num_inference_steps=STEPS, output_type=output_type, num_images_per_prompt=2)
    assert a.shape == b.shape == ((4, SIZE, SIZE, 3) if output_type == "np" else (4, 3, SIZE, SIZE))
    if output_type == "pt":
        assert a.min() < 0  # diffusers returns MoVQ's [-1, 1] for "pt"
    assert_close(a, b)


def test_decoder_float32(decoder_folder):
    from minidiff import KandinskyV22Pipeline

    e, neg = (x.float() for x in embeds())
    kw = dict(image_embeds=e, negative_image_embeds=neg, height=SIZE, width=SIZE, num_inference_steps=STEPS,
              output_type="pt")
    a = quiet(KandinskyV22Pipeline.from_pretrained(decoder_folder))(**kw, generator=gen()).images
    b = quiet(diffusers.KandinskyV22Pipeline.from_pretrained(decoder_folder))(**kw, generator=gen()).images
    assert a.dtype == torch.float32
    assert_close(a, b, FP32_RTOL)


def test_decoder_without_guidance_and_with_odd_size(decoder_folder):
    e, neg = embeds(1)  # diffusers requires negative_image_embeds even when it does not use it
    a, b = run_both(decoder_folder, image_embeds=e, negative_image_embeds=neg, height=30, width=26, guidance_scale=1.0,
                    num_inference_steps=STEPS, output_type="np")
    assert a.shape == (1, 32, 28, 3)  # rounded up to multiples of f**2 = 4, as diffusers does
    assert_close(a, b)


def test_decoder_ddim_and_learned_variance(decoder_folder):
    from minidiff import DDIMScheduler, DDPMScheduler

    e, neg = embeds()
    a, b = run_both(decoder_folder, (DDIMScheduler, diffusers.DDIMScheduler), image_embeds=e,
                    negative_image_embeds=neg, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    assert_close(a, b)

    # learned_range: the scheduler reads the UNet's variance channels (the conditional half's under guidance)
    from minidiff import KandinskyV22Pipeline

    ours = KandinskyV22Pipeline.from_pretrained(decoder_folder)
    ref = diffusers.KandinskyV22Pipeline.from_pretrained(decoder_folder)
    ours.scheduler = DDPMScheduler.from_config({**dict(ours.scheduler.config), "variance_type": "learned_range"})
    public = {k: v for k, v in ref.scheduler.config.items() if not k.startswith("_")}  # see test_schedulers.py
    ref.scheduler = diffusers.DDPMScheduler.from_config({**public, "variance_type": "learned_range"})
    ours, ref = f64(ours, False), f64(ref, True)
    kw = dict(image_embeds=e, negative_image_embeds=neg, height=SIZE, width=SIZE, num_inference_steps=STEPS,
              output_type="np")
    a, b = ours(**kw, generator=gen()).images, ref(**kw, generator=gen()).images
    assert_close(a, b)
    fixed = a
    ours.scheduler = DDPMScheduler.from_config(dict(ours.scheduler.config, variance_type="fixed_small"))
    assert np.abs(ours(**kw, generator=gen()).images - fixed).max() > 1e-3  # the variance channels matter


def test_combined_pipeline_through_the_guides_hand_over(decoder_folder, prior_folder, tmp_path):
    """The training guide's inference code: a prior pipeline's components, prefixed with prior_,
    handed to AutoPipelineForText2Image.from_pretrained(decoder folder)."""
    from minidiff import AutoPipelineForText2Image, DiffusionPipeline, KandinskyV22CombinedPipeline

    prior_pipeline = DiffusionPipeline.from_pretrained(prior_folder)
    prior_components = {"prior_" + k: v for k, v in prior_pipeline.components.items()}
    pipe = AutoPipelineForText2Image.from_pretrained(decoder_folder, **prior_components)
    assert isinstance(pipe, KandinskyV22CombinedPipeline)
    pipe = f64(pipe, False)

    ref_prior = diffusers.DiffusionPipeline.from_pretrained(prior_folder)
    ref = f64(diffusers.AutoPipelineForText2Image.from_pretrained(
        decoder_folder, **{"prior_" + k: v for k, v in ref_prior.components.items()}), True)
    kw = dict(prompt=["a red square", "a blue circle"], negative_prompt=["blurry", "dark"], height=SIZE, width=SIZE,
              num_inference_steps=STEPS, prior_num_inference_steps=3, output_type="np", num_images_per_prompt=2)
    a, b = pipe(**kw, generator=gen()).images, ref(**kw, generator=gen()).images
    assert a.shape == (4, SIZE, SIZE, 3)
    assert_close(a, b)

    # The combined folder diffusers saves loads through DiffusionPipeline and gives the same images.
    ref.save_pretrained(tmp_path / "combined")
    again = DiffusionPipeline.from_pretrained(tmp_path / "combined", torch_dtype=torch.float64)
    assert isinstance(again, KandinskyV22CombinedPipeline)
    assert_close(f64(again, False)(**kw, generator=gen()).images, b)
    # ... and minidiff's save_pretrained writes one diffusers reads back.
    pipe.save_pretrained(tmp_path / "ours")
    back = f64(diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours"), True)
    assert_close(back(**kw, generator=gen()).images, b)


def test_decoder_folder_names_its_prior(decoder_folder, prior_folder, tmp_path):
    """A decoder folder whose README names a prior (diffusers' connected pipelines) loads as the
    combined pipeline by itself; without one, the error says what to pass."""
    import shutil

    from minidiff import AutoPipelineForText2Image, KandinskyV22CombinedPipeline

    folder = tmp_path / "decoder"
    shutil.copytree(decoder_folder, folder)
    with pytest.raises(InputError, match="names no prior"):
        AutoPipelineForText2Image.from_pretrained(folder)
    shutil.copytree(prior_folder, tmp_path / "prior")
    (folder / "README.md").write_text("---\nprior:\n- ../prior\n---\n# a decoder\n")
    pipe = AutoPipelineForText2Image.from_pretrained(folder)
    assert isinstance(pipe, KandinskyV22CombinedPipeline)
    assert pipe.prior_prior.config.embedding_dim == TEXT_HIDDEN


def test_callback_on_step_end_can_replace_latents(decoder_folder):
    from minidiff import KandinskyV22Pipeline

    pipe = quiet(KandinskyV22Pipeline.from_pretrained(decoder_folder))
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == STEPS - 1 else {}

    e, neg = embeds(1)
    out = pipe(e, neg, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent",
               callback_on_step_end=callback, generator=gen()).images
    assert [s[0] for s in seen] == list(range(STEPS)) and seen[0][2] == (1, 4, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))


def test_bad_input_is_one_sentence_before_any_work(decoder_folder):
    from minidiff import KandinskyV22Pipeline

    pipe = quiet(KandinskyV22Pipeline.from_pretrained(decoder_folder))
    e, neg = embeds(1)
    cases = [
        (dict(image_embeds=torch.randn(1, 7), negative_image_embeds=neg), "features"),
        (dict(image_embeds=e), "negative_image_embeds"),
        (dict(image_embeds=e, negative_image_embeds=embeds(2)[1]), "one per image embedding"),
        (dict(image_embeds=e, negative_image_embeds=neg, height=0), "height"),
        (dict(image_embeds=e, negative_image_embeds=neg, output_type="jpeg"), "output_type"),
        (dict(image_embeds=torch.randn(TEXT_HIDDEN), negative_image_embeds=neg), "shape"),
    ]
    for kwargs, words in cases:
        with pytest.raises(InputError, match=words):
            pipe(**kwargs, num_inference_steps=1)


def test_minidiff_generate_on_a_kandinsky_decoder_folder(decoder_folder, prior_folder, tmp_path, capsys):
    """`minidiff generate --model DECODER` runs prompt -> prior -> decoder; SD-only commands and
    flags are refused with one sentence."""
    import shutil

    import PIL.Image

    from minidiff.cli import main

    folder = tmp_path / "decoder"
    shutil.copytree(decoder_folder, folder)
    shutil.copytree(prior_folder, tmp_path / "prior")
    (folder / "README.md").write_text("---\nprior:\n- ../prior\n---\n")
    out = tmp_path / "out"
    code = main(["generate", "a red square", "--model", str(folder), "--steps", "2", "--prior-steps", "2",
                 "--height", "32", "--width", "16", "--num-images", "2", "--out", str(out)])
    assert code == 0
    assert [PIL.Image.open(out / f"image_{i}.png").size for i in range(2)] == [(16, 32)] * 2
    capsys.readouterr()
    assert main(["generate", "a red square", "--model", str(folder), "--height", "30", "--out", str(tmp_path / "x")]) == 2
    assert "multiples of 4" in capsys.readouterr().err
    assert main(["edit", "img.png", "--model", str(folder), "--source", "a", "--target", "b",
                 "--out", str(tmp_path / "y")]) == 2
    assert "Kandinsky decoder" in capsys.readouterr().err
