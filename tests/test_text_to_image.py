"""Text-to-image end to end: the same tiny random checkpoint (written by diffusers/transformers)
loaded by diffusers' StableDiffusionPipeline and by minidiff's, same seeds, same images."""

import numpy as np
import pytest
import torch

from minidiff.pipelines.text_to_image import StableDiffusionPipeline
from minidiff.reference import save_tiny_pipeline

# Tolerance: the two pipelines do the same float32 arithmetic with the same kernels except for
# summation order inside attention/convolutions (~1e-7 relative per op); over 3-10 steps the
# images agree to ~1e-6. 1e-4 (the bar) leaves room for other BLAS builds, and still
# catches any real difference (a wrong guidance formula or timestep moves pixels by > 1e-2).
ATOL = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipes(request, tmp_path_factory):
    import diffusers

    folder = save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{request.param}"), flavour=request.param)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, ref


CASES = [
    dict(prompt="a red circle", num_inference_steps=3, guidance_scale=7.5),
    dict(prompt=["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=1.0),
    dict(prompt="a star", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, num_images_per_prompt=2),
    dict(prompt="a star", num_inference_steps=10, guidance_scale=3.0, eta=0.5),
    dict(prompt="a star", num_inference_steps=3, guidance_scale=7.5, clip_skip=1),
]


def reference_clip_skip_embeds(ref, prompt, clip_skip):
    """diffusers' own clip_skip path calls `text_encoder.text_model.final_layer_norm`, which
    transformers >= 5.6 no longer has on CLIPTextModel (it is flattened); so we compute the
    reference embeddings the way diffusers means to: the hidden state `clip_skip` layers before
    the last, through the final layer norm of transformers' model."""
    ids = ref.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    te = ref.text_encoder
    states = te(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
    return norm(states)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "prompt"))
def test_images_match_diffusers(pipes, case):
    ours, ref = pipes
    kw = dict(height=32, width=32, output_type="np", **case)
    a = ours(generator=torch.Generator().manual_seed(0), **kw).images
    if "clip_skip" in kw:
        with torch.no_grad():
            kw["prompt_embeds"] = reference_clip_skip_embeds(ref, kw.pop("prompt"), kw.pop("clip_skip"))
    b = ref(generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_latents_and_embeds_inputs_match(pipes):
    ours, ref = pipes
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    c, c_neg = ours.encode_prompt("a green triangle", "cpu", 1, True)
    rc, rc_neg = ref.encode_prompt("a green triangle", "cpu", 1, True)
    torch.testing.assert_close(c, rc, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_neg, rc_neg, atol=1e-5, rtol=0)
    kw = dict(num_inference_steps=3, output_type="latent", latents=latents)
    a = ours(prompt_embeds=c, negative_prompt_embeds=c_neg, **kw).images
    b = ref(prompt_embeds=rc, negative_prompt_embeds=rc_neg, **kw).images
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_output_types_and_callback(pipes):
    ours, _ = pipes
    seen = []
    out = ours("a circle", height=32, width=32, num_inference_steps=3, output_type="pil",
               generator=torch.Generator().manual_seed(0), callback=lambda i, t, x, eps: seen.append((i, int(t), x.shape, eps.shape)))
    assert len(out.images) == 1 and out.images[0].size == (32, 32)
    assert [s[0] for s in seen] == [0, 1, 2]
    pt = ours("a circle", height=32, width=32, num_inference_steps=2, output_type="pt", return_dict=False)[0]
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1


def test_bad_input(pipes):
    ours, _ = pipes
    with pytest.raises(ValueError, match="needs positive multiples of"):
        ours("x", height=34, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="needs positive multiples of"):
        ours("x", height=0, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="at least 1"):
        ours("x", height=32, width=32, num_inference_steps=0)
    with pytest.raises(ValueError, match="negative prompts"):
        ours(["a", "b", "c"], negative_prompt=["x", "y"], height=32, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="latents must have shape"):
        ours("x", height=32, width=32, num_inference_steps=1, latents=torch.zeros(1, 4, 8, 8))
    with pytest.warns(UserWarning, match="were dropped"):
        ours("word " * 100, height=32, width=32, num_inference_steps=1, output_type="latent")
    with pytest.raises(FileNotFoundError):
        StableDiffusionPipeline.from_pretrained("/no/such/folder")
