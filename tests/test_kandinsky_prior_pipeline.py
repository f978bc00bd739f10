"""The Kandinsky 2.2 prior pipeline end to end: one tiny random folder written by diffusers'
KandinskyV22PriorPipeline, loaded by both libraries, sampled with the same generator."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_rel_close
from minidiff.errors import InputError
from minidiff.reference import save_tiny_prior_pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import KandinskyV22PriorPipeline as RefPipeline

    from minidiff import DiffusionPipeline

    folder = save_tiny_prior_pipeline(tmp_path_factory.mktemp("tiny-prior"))
    ref = RefPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ref, ours, folder


def _both(pipes, seed=0, **kw):
    ref, ours, _ = pipes
    a = ref(generator=torch.Generator().manual_seed(seed), **kw)
    b = ours(generator=torch.Generator().manual_seed(seed), **kw)
    return a, b


CASES = {
    "guided": dict(prompt="a red circle"),
    "two prompts, two each": dict(prompt=["a red circle", "a blue square on a gray background"], num_images_per_prompt=2),
    "no guidance": dict(prompt="a red circle", guidance_scale=1.0),
    "negative prompt": dict(prompt="a red circle", negative_prompt="a green star"),
    "few steps": dict(prompt="a yellow star", num_inference_steps=3, guidance_scale=7.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_embeddings_match_diffusers(pipes, case):
    """fp32, 25 UnCLIP steps: the loop, the guidance, the scheduler's noise and the zero-image
    negative embedding all equal diffusers' to 1e-5 relative."""
    a, b = _both(pipes, **CASES[case])
    assert_rel_close(b.image_embeds, a.image_embeds, 1e-5, f"{case}: image_embeds")
    assert_rel_close(b.negative_image_embeds, a.negative_image_embeds, 1e-5, f"{case}: negative_image_embeds")


def test_the_folder_is_the_kandinsky_prior_layout(pipes):
    from minidiff.pipelines.kandinsky import KandinskyV22PriorPipeline

    _, ours, _ = pipes
    assert type(ours) is KandinskyV22PriorPipeline
    assert set(ours.components) == {"prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor"}
    assert type(ours.scheduler).__name__ == "UnCLIPScheduler"


def test_negative_embeds_without_negative_prompt_are_the_zero_image_embedding(pipes):
    _, ours, _ = pipes
    out = ours("a red circle", generator=torch.Generator().manual_seed(0), num_images_per_prompt=3)
    zero = ours.get_zero_embed(3)
    torch.testing.assert_close(out.negative_image_embeds, zero)
    assert not torch.allclose(out.image_embeds[0], zero[0])


def test_guided_negative_mode_fixes_the_negative_half(pipes):
    """diffusers' negative half is the negative prompt guided against itself (unguided); the guided
    mode guides it against "". The positive half is the same in both modes."""
    _, ours, _ = pipes
    kw = dict(prompt="a red circle", negative_prompt="a green star", guidance_scale=4.0)
    compat = ours(generator=torch.Generator().manual_seed(0), **kw)
    guided = ours(generator=torch.Generator().manual_seed(0), negative_mode="guided", **kw)
    torch.testing.assert_close(guided.image_embeds, compat.image_embeds)
    assert (guided.negative_image_embeds - compat.negative_image_embeds).abs().max() > 1e-3


def test_output_types_and_tuple(pipes):
    ref, ours, _ = pipes
    out = ours("a red circle", output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.image_embeds.shape == (1, ours.prior.config.embedding_dim)
    emb, neg = ours("a red circle", return_dict=False, generator=torch.Generator().manual_seed(0))
    assert emb.shape == neg.shape
    image_emb, negative_emb = ours("a red circle", generator=torch.Generator().manual_seed(0)).to_tuple()
    torch.testing.assert_close(image_emb, emb)


def test_bad_input_is_one_sentence(pipes):
    _, ours, _ = pipes
    with pytest.raises(InputError, match="num_inference_steps"):
        ours("a red circle", num_inference_steps=0)
    with pytest.raises(InputError, match="output_type"):
        ours("a red circle", output_type="pil")
    with pytest.raises(InputError, match="negative prompts for 2 prompts"):
        ours(["a", "b"], negative_prompt=["x", "y", "z"])
    with pytest.raises(InputError, match="negative_mode"):
        ours("a", negative_mode="fixed")
    with pytest.raises(InputError, match="latents must have shape"):
        ours("a", latents=torch.zeros(2, 3))
