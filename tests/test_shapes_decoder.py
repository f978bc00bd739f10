"""The shipped shapes decoder (weights/shapes-decoder, with weights/shapes-prior as its prior): the
same images as diffusers from the same folders, the MoVQ's reconstructions, and the quality of
text -> prior -> decoder on a small fixed sample of held-out prompts (thresholds below what the
sample scored when it was shipped, in the comments; the 200-prompt figures are in its model card)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DECODER = ROOT / "weights" / "shapes-decoder"

N = 25  # held-out single-object "test" prompts, one batch
PSNR_MIN = 32.0  # MoVQ force_not_quantize reconstructions of 50 held-out val scenes, dB; measured 34.7
BOTH_MIN = 0.4  # colour and shape right, text -> prior -> decoder; measured 0.60 (200 prompts: 0.565)


@pytest.fixture(scope="module")
def pipe():
    from minidiff import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(DECODER, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_decoder_folder_names_its_prior_and_diffusers_reads_it(pipe):
    import diffusers

    assert type(pipe).__name__ == "KandinskyV22CombinedPipeline"
    assert type(diffusers.DiffusionPipeline.from_pretrained(DECODER)).__name__ == "KandinskyV22Pipeline"


def test_shipped_decoder_matches_diffusers(pipe, monkeypatch):
    """diffusers' AutoPipelineForText2Image finds the prior through the same front matter (it reads
    the path relative to the working directory: the repository root) and gives the same images."""
    import diffusers

    monkeypatch.chdir(ROOT)
    ref = diffusers.AutoPipelineForText2Image.from_pretrained(DECODER, torch_dtype=torch.float32)
    assert type(ref).__name__ == "KandinskyV22CombinedPipeline"
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red circle on a white background", "a blue star on a yellow background"], height=128,
              width=128, num_inference_steps=10, prior_num_inference_steps=10, output_type="np")
    a = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    b = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - b).max() <= 1e-3, np.abs(a - b).max()  # fp32 images in [0, 1]; measured max 8.6e-5


def test_shipped_movq_reconstructs(pipe):
    from minidiff.training.shapes.kandinsky import evaluate_movq

    assert evaluate_movq(pipe.movq, n=50)["psnr_force_not_quantize"] >= PSNR_MIN


def test_shipped_text_prior_decoder_quality():
    from minidiff.training.shapes.kandinsky import evaluate_kandinsky

    r = evaluate_kandinsky(DECODER, n=N, steps=50, progress=False, judge_folder=ROOT / "weights" / "shapes" / "judge")
    assert r["text_prior_decoder"]["both"] >= BOTH_MIN, r
