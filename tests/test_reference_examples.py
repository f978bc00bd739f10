"""The code examples of ../shared/reference/ (diffusers' documentation pages), run on minidiff.

Each test is one example, written as the document writes it, with only these changes:
    the import           `from diffusers import X` -> `from minidiff import X`
    the model            the hub id -> weights/shapes (or a tiny random folder), and what depends on
                         the model: its prompts, its image (weights/examples/), its component
                         names (Flux's "transformer" -> SD's "unet"), its text width (768 -> 32)
    a CPU                "cuda" -> "cpu", float16 -> float32 (fp16 runs on a CPU, ~10x slower)
    step counts          50 -> a few; sizes where the example is about memory, not size
Where diffusers can run the same example on the same folder on a CPU, the test runs it too and
compares. Examples that cannot run on a CPU in diffusers say why.

    document                        examples  here
    diffedit-pipeline-api.md        3         generate_mask, invert, __call__
    reduce-memory-usage.md          8         sliced VAE, tiled VAE, sequential offload, model
                                              offload, channels-last, tracing, traced UNet in the
                                              pipeline, memory-efficient attention
    quantization-compile-offload.md 2         quantize + compile, quantize + compile + offload
    distributed-inference.md        -         (issue: distributed)
    kandinsky22-prior-training.md   1         the inference code: a trained prior handed to
                                              AutoPipelineForText2Image with a decoder

Deviations the examples need (each asserted below): the tiled-VAE example swaps in
UniPCMultistepScheduler, which minidiff does not have (DDIMScheduler instead: the one line that
changes beyond the list above); diffusers 0.42 itself no longer has `pipe.enable_vae_slicing()` /
`enable_vae_tiling()` (removed from its pipelines) and refuses `enable_model_cpu_offload()` and
bitsandbytes quantization without a GPU, and its pipeline fails on the traced-UNet wrapper of the
tracing example (it reads `unet.config`, which the wrapper lacks).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "weights" / "shapes")
EXAMPLE_IMAGE = ROOT / "weights" / "examples" / "red_circle_green_triangle.png"
MASK_PROMPT = "a red circle and a green triangle on a white background"  # the doc's "A bowl of fruits"
PROMPT = "a blue square and a green triangle on a white background"  # the doc's "A bowl of pears"
STEPS = 4
IMAGE_ATOL = 1e-4  # whole images after a few steps, same arithmetic as diffusers (test_text_to_image.py)


def open_image():
    # The documents' `download_image(img_url).resize((768, 768))`, with the bundled shapes image.
    return PIL.Image.open(EXAMPLE_IMAGE).convert("RGB").resize((128, 128))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------
# diffedit-pipeline-api.md: the three examples share their first lines; the third runs all steps.


def diffedit_example(library, offload: bool):
    """The `__call__` example of the DiffEdit page (the other two are its first lines)."""
    StableDiffusionDiffEditPipeline = library.StableDiffusionDiffEditPipeline
    DDIMScheduler, DDIMInverseScheduler = library.DDIMScheduler, library.DDIMInverseScheduler  # the doc forgets to import them
    init_image = open_image()
    pipeline = StableDiffusionDiffEditPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    quiet(pipeline)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.inverse_scheduler = DDIMInverseScheduler.from_config(pipeline.scheduler.config)
    if offload:
        pipeline.enable_model_cpu_offload()
    mask_prompt = MASK_PROMPT
    prompt = PROMPT
    # A generator is added to the three calls (the document leaves the noise unseeded), so that
    # the two libraries draw the same noise and can be compared.
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    mask_image = pipeline.generate_mask(image=init_image, source_prompt=prompt, target_prompt=mask_prompt, generator=gen())
    image_latents = pipeline.invert(image=init_image, prompt=mask_prompt, num_inference_steps=STEPS, generator=gen()).latents
    image = pipeline(prompt=prompt, mask_image=mask_image, image_latents=image_latents,
                     num_inference_steps=STEPS, generator=gen()).images[0]
    return mask_image, image_latents, image


def test_diffedit_examples_match_diffusers():
    import diffusers

    import minidiff

    with pytest.warns(UserWarning, match="saves no memory"):  # enable_model_cpu_offload() on a CPU
        mask, latents, image = diffedit_example(minidiff, offload=True)
    assert mask.shape == (1, 16, 16) and set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 1
    assert latents.shape == (1, int(STEPS * 0.8), 4, 16, 16)
    assert isinstance(image, PIL.Image.Image) and image.size == (128, 128)
    # diffusers on a CPU refuses enable_model_cpu_offload ("requires accelerator"); the rest is the same.
    with pytest.raises(RuntimeError, match="accelerator"):
        diffedit_example(diffusers, offload=True)
    ref_mask, ref_latents, ref_image = diffedit_example(diffusers, offload=False)
    np.testing.assert_array_equal(mask, ref_mask)
    torch.testing.assert_close(latents, ref_latents, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(image, dtype=np.float32), np.asarray(ref_image, dtype=np.float32), atol=1.0)


# ----------------------------------------------------------------------------------------------
# reduce-memory-usage.md


def test_sliced_vae_example():
    from minidiff import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL,
        torch_dtype=torch.float32,
        use_safetensors=True,
    )
    pipe = pipe.to("cpu")
    prompt = "a red circle on a white background"
    pipe.enable_vae_slicing()
    # pipe.enable_xformers_memory_efficient_attention()
    quiet(pipe)
    images = pipe([prompt] * 32, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 32 and images[0].size == (128, 128)
    pipe.disable_vae_slicing()
    again = pipe([prompt] * 32, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(np.asarray(images[31], dtype=float), np.asarray(again[31], dtype=float), atol=1.0)


def test_tiled_vae_example():
    import diffusers

    from minidiff import DDIMScheduler, StableDiffusionPipeline  # minidiff has no UniPCMultistepScheduler

    assert not hasattr(__import__("minidiff"), "UniPCMultistepScheduler")
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL,
        torch_dtype=torch.float32,
        use_safetensors=True,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to("cpu")
    prompt = "a beautiful landscape photograph"
    pipe.enable_vae_tiling()
    # pipe.enable_xformers_memory_efficient_attention()
    quiet(pipe)
    # 3840x2224 in the document; 384x256 here is still well above the VAE's 128-pixel tile.
    image = pipe([prompt], width=384, height=256, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (256, 384, 3)
    # diffusers 0.42 has dropped the pipeline method; its VAE switch gives the same image.
    ref = quiet(diffusers.StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None))
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    assert not hasattr(ref, "enable_vae_tiling")
    ref.vae.enable_tiling()
    expected = ref([prompt], width=384, height=256, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_allclose(image, expected, atol=IMAGE_ATOL, rtol=0)


@pytest.mark.parametrize("method", ["enable_sequential_cpu_offload", "enable_model_cpu_offload"])
def test_cpu_offloading_examples(method):
    from minidiff import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL,
        torch_dtype=torch.float32,
        use_safetensors=True,
    )
    quiet(pipe)
    prompt = "a photo of an astronaut riding a horse on mars"
    expected = pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images[0]
    with pytest.warns(UserWarning, match="saves no memory"):
        getattr(pipe, method)()
    image = pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


def test_channels_last_example():
    from minidiff import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    print(pipe.unet.conv_out.state_dict()["weight"].stride())  # (2880, 9, 3, 1) for SD 1.5
    c = pipe.unet.conv_out.weight.shape[1]
    assert pipe.unet.conv_out.state_dict()["weight"].stride() == (c * 9, 9, 3, 1)
    pipe.unet.to(memory_format=torch.channels_last)  # in-place operation
    print(pipe.unet.conv_out.state_dict()["weight"].stride())  # (2880, 1, 960, 320) for SD 1.5
    assert pipe.unet.conv_out.state_dict()["weight"].stride() == (c * 9, 1, 3 * c, c)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_tracing_examples(tmp_path, monkeypatch):
    """Both tracing examples: trace and time the UNet, save it; load it, wrap it, and hand the
    wrapper to the pipeline in place of the UNet."""
    from dataclasses import dataclass

    from minidiff import StableDiffusionPipeline

    monkeypatch.chdir(tmp_path)  # the example saves "unet_traced.pt" in the working folder
    torch.set_grad_enabled(False)
    try:
        n_experiments = 2
        unet_runs_per_experiment = 3  # 50 in the document

        def generate_inputs():
            sample = torch.randn((2, 4, 16, 16), device="cpu", dtype=torch.float32)
            timestep = torch.rand(1, device="cpu", dtype=torch.float32) * 999
            encoder_hidden_states = torch.randn((2, 77, 64), device="cpu", dtype=torch.float32)  # 768 for SD 1.5
            return sample, timestep, encoder_hidden_states

        pipe = StableDiffusionPipeline.from_pretrained(
            MODEL,
            torch_dtype=torch.float32,
            use_safetensors=True,
        ).to("cpu")
        quiet(pipe)
        prompt = "a red circle on a white background"
        expected = pipe([prompt] * 1, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images[0]
        unet = pipe.unet
        unet.eval()
        unet.to(memory_format=torch.channels_last)  # use channels_last memory format
        unet.forward = functools.partial(unet.forward, return_dict=False)  # set return_dict=False as default
        for _ in range(3):
            with torch.inference_mode():
                inputs = generate_inputs()
                orig_output = unet(*inputs)
        unet_traced = torch.jit.trace(unet, inputs)
        unet_traced.eval()
        for _ in range(5):
            with torch.inference_mode():
                inputs = generate_inputs()
                orig_output = unet_traced(*inputs)
        with torch.inference_mode():
            for _ in range(n_experiments):
                start_time = time.time()
                for _ in range(unet_runs_per_experiment):
                    orig_output = unet_traced(*inputs)
                print(f"unet traced inference took {time.time() - start_time:.2f} seconds")
            for _ in range(n_experiments):
                start_time = time.time()
                for _ in range(unet_runs_per_experiment):
                    orig_output = unet(*inputs)  # noqa: F841 (the document's line)
                print(f"unet inference took {time.time() - start_time:.2f} seconds")
        unet_traced.save("unet_traced.pt")
        # The trace follows its inputs: new latents, timestep and text give the eager result.
        fresh = generate_inputs()
        torch.testing.assert_close(unet_traced(*fresh)[0], unet(*fresh)[0], rtol=1e-5, atol=1e-5)

        # --- second example: the traced UNet inside the pipeline ---
        @dataclass
        class UNet2DConditionOutput:
            sample: torch.Tensor

        pipe = StableDiffusionPipeline.from_pretrained(
            MODEL,
            torch_dtype=torch.float32,
            use_safetensors=True,
        ).to("cpu")
        quiet(pipe)
        unet_traced = torch.jit.load("unet_traced.pt")

        class TracedUNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.in_channels = pipe.unet.config.in_channels
                self.device = pipe.unet.device

            def forward(self, latent_model_input, t, encoder_hidden_states):
                sample = unet_traced(latent_model_input, t, encoder_hidden_states)[0]
                return UNet2DConditionOutput(sample=sample)

        pipe.unet = TracedUNet()
        with torch.inference_mode():
            image = pipe([prompt] * 1, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images[0]
        np.testing.assert_allclose(np.asarray(image, dtype=float), np.asarray(expected, dtype=float), atol=1.0)

        # diffusers 0.42 itself no longer runs this example: its loop reads `unet.config`.
        import diffusers

        ref = quiet(diffusers.StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None))
        ref.unet = pipe.unet  # the same TracedUNet instance
        with pytest.raises(AttributeError, match="config"):
            ref([prompt] * 1, num_inference_steps=STEPS)
    finally:
        torch.set_grad_enabled(True)


def test_unet_exports_with_torch_export():
    """Beyond the document: torch.export.export of the UNet, the graph-capture successor of tracing."""
    from minidiff import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    args = (torch.randn(2, 4, 16, 16), torch.tensor([500.0]), torch.randn(2, 77, 64))
    with torch.no_grad():
        exported = torch.export.export(unet, args, kwargs={"return_dict": False})
        new = (torch.randn(2, 4, 16, 16), torch.tensor([20.0]), torch.randn(2, 77, 64))
        torch.testing.assert_close(exported.module()(*new, return_dict=False)[0], unet(*new).sample, rtol=1e-5, atol=1e-5)


def test_memory_efficient_attention_example():
    from minidiff import DiffusionPipeline, attention_backend

    pipe = DiffusionPipeline.from_pretrained(
        MODEL,
        torch_dtype=torch.float32,
        use_safetensors=True,
    ).to("cpu")
    quiet(pipe)
    with attention_backend("math"):  # restored afterwards; the method selects "auto"
        pipe.enable_attention_slicing()
        pipe.enable_xformers_memory_efficient_attention()
        from minidiff.models.attention import get_attention_backend

        assert get_attention_backend() == "auto"
        assert all(getattr(m, "slice_size", None) is None for m in pipe.unet.modules())
        with torch.inference_mode():
            sample = pipe("a small cat", num_inference_steps=STEPS)
        assert sample.images[0].size == (128, 128)
        # optional: You can disable it via
        pipe.disable_xformers_memory_efficient_attention()


# ----------------------------------------------------------------------------------------------
# quantization-compile-offload.md (Flux -> the shapes SD model: "transformer" -> "unet",
# "text_encoder_2" -> "text_encoder")


def quantized_pipeline():
    from minidiff import DiffusionPipeline
    from minidiff.quantizers import PipelineQuantizationConfig

    pipeline_quant_config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        components_to_quantize=["unet", "text_encoder"],
    )
    pipeline = DiffusionPipeline.from_pretrained(
        MODEL,
        quantization_config=pipeline_quant_config,
        torch_dtype=torch.bfloat16,
    ).to("cpu")
    return quiet(pipeline)


PROMPT_CAT = "a yellow star on a white background"  # the document's cat in Palm Springs


def run(pipeline):
    return pipeline(PROMPT_CAT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def assert_bf16_close(actual, expected, backend):
    """NF4 weights with bf16 compute, eager vs compiled (and channels-last): the same ops in
    another order. bf16 keeps 8 significant bits, so a few pixels move: measured max 0.087 (116 of
    49152 values) with the eager / aot_eager backends, 0.208 with inductor, which fuses and rounds
    the bf16 intermediates differently; the mean stays near 1e-3 (inductor: 1.1e-3), far below a
    real error's."""
    diff = np.abs(actual - expected)
    assert diff.mean() < 2e-3 and diff.max() < (0.3 if backend == "inductor" else 0.15), (diff.mean(), diff.max())


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_quantize_and_compile_example(backend):
    """The document's `compile(mode="max-autotune", fullgraph=True)` is inductor (slow tier); CI
    checks the same full-graph capture with the eager backend (no graph break allowed)."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    pipeline = quantized_pipeline()
    # The document's channels-last first, then the eager reference in that same memory format:
    # the test is about compilation. (Channels-last itself moves bf16 pixels by a CPU-dependent
    # amount, oneDNN picking other convolution kernels: measured max 0.222, mean 1.1e-3, on an
    # AVX512-BF16 EPYC, where compile(backend="eager") alone changed nothing, max 0.)
    pipeline.unet.to(memory_format=torch.channels_last)
    expected = run(pipeline)
    if backend == "inductor":
        pipeline.unet.compile(mode="max-autotune", fullgraph=True)
    else:
        pipeline.unet.compile(backend=backend, fullgraph=True)
    try:
        assert_bf16_close(run(pipeline), expected, backend)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_quantize_compile_and_offload_example(backend):
    torch._dynamo.config.cache_size_limit = 1000
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    pipeline = quantized_pipeline()
    expected = run(pipeline)
    with pytest.warns(UserWarning, match="saves no memory"):
        pipeline.enable_model_cpu_offload()
    pipeline.unet.compile(backend=backend)
    try:
        assert_bf16_close(run(pipeline), expected, backend)
        assert_bf16_close(run(pipeline), expected, backend)  # the compiled graph reused
    finally:
        torch._dynamo.reset()
        pipeline.remove_all_hooks()


# ----------------------------------------------------------------------------------------------
# kandinsky22-prior-training.md: the inference code after training.


def kandinsky_guide_example(library, output_dir, decoder):
    """The guide's code, with `output_dir` its trained prior (weights/shapes-prior, which
    `minidiff train-prior` trained) and the decoder repo id -> weights/shapes-decoder. The
    document calls `pipe.enable_model_cpu_offload()` on an undefined `pipe` and passes an
    undefined `negative_prompt`; here they are `pipeline` and None."""
    AutoPipelineForText2Image, DiffusionPipeline = library.AutoPipelineForText2Image, library.DiffusionPipeline
    prior_pipeline = DiffusionPipeline.from_pretrained(output_dir, torch_dtype=torch.float32)
    prior_components = {"prior_" + k: v for k, v in prior_pipeline.components.items()}
    pipeline = AutoPipelineForText2Image.from_pretrained(decoder, **prior_components, torch_dtype=torch.float32)
    quiet(pipeline)
    if library.__name__ == "minidiff":  # diffusers 0.42 refuses model offload without an accelerator
        with pytest.warns(UserWarning, match="saves no memory"):
            pipeline.enable_model_cpu_offload()
    prompt = "a red circle on a white background"
    negative_prompt = None
    # A generator and a few steps are added (the document leaves the noise unseeded, 100 + 25 steps).
    return pipeline(prompt=prompt, negative_prompt=negative_prompt, height=128, width=128, num_inference_steps=STEPS,
                    prior_num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images[0]


def test_kandinsky_guide_inference_example(monkeypatch):
    import diffusers

    import minidiff

    monkeypatch.chdir(ROOT)  # diffusers reads the decoder card's prior path from the working directory

    prior, decoder = ROOT / "weights" / "shapes-prior", ROOT / "weights" / "shapes-decoder"
    ours = kandinsky_guide_example(minidiff, prior, decoder)
    ref = kandinsky_guide_example(diffusers, prior, decoder)
    assert ours.size == ref.size == (128, 128)
    diff = np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32))
    assert diff.max() <= 1, diff.max()  # PIL images of the same float32 arithmetic: at most one level apart
