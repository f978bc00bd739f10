"""Channels-last and regional compilation (minidiff/memory/compile.py).

Fast tests compile with Dynamo and a cheap backend ("aot_eager": Dynamo capture plus AOTAutograd
tracing, then the traced aten ops run eagerly; or a counting backend that runs the captured FX
graph as is), so they check the capture, the block selection and the graph sharing in seconds.
The inductor tests (C++ code generation with gcc, ~5-20 s per graph on 2 cores) are marked slow.
"""

import copy

import pytest
import torch
import torch._dynamo

from minidiff.memory.compile import REPEATED_BLOCKS, compile_blocks, to_channels_last, uncompile_blocks
from minidiff.memory.offload import (OffloadTracer, apply_group_offloading, enable_model_cpu_offload,
                                     enable_sequential_cpu_offload, remove_offload)
from minidiff.models.clip import CLIPTextConfig, CLIPTextModel
from minidiff.models.unet import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.pipelines.text_to_image import StableDiffusionPipeline
from minidiff.reference import save_tiny_pipeline, tiny_unet, tiny_vae
from tests.helpers import assert_rel_close

# Channels-last and the eager-like backends run the same float32 ops on the same values; only
# the kernels' summation order changes (channels-last convs take another oneDNN path). Measured:
# UNet 1.2e-6, VAE encode 7e-7, VAE round trip 2.7e-6 relative; aot_eager 0 (same kernels).
# 1e-5 is the bar.
RTOL = 1e-5
# Inductor fuses and reorders float32 reductions (GroupNorm, softmax, GEGLU) and may use its own
# GEMM tiling; measured 9.7e-7 relative on the tiny UNet. 1e-4 still fails on any wrong op.
INDUCTOR_RTOL = 1e-4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # compiled code from another test must not be counted or reused here
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile-models")
    tiny_unet("sd2").save_pretrained(folder / "unet")
    tiny_vae(sample_size=32).save_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    gen = torch.Generator().manual_seed(0)
    unet_in = (torch.randn(2, 4, 16, 16, generator=gen), 500, torch.randn(2, 77, 32, generator=gen))
    image = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    return unet, vae, unet_in, image


class CountingBackend:
    """A torch.compile backend that records each captured graph and runs it unchanged."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@torch.no_grad()
def test_channels_last_unet(models):
    unet, _, (x, t, context), _ = models
    expected = unet(x, t, context).sample
    fast = to_channels_last(copy.deepcopy(unet))
    w = fast.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert_rel_close(fast(x, t, context).sample, expected, RTOL, "channels-last UNet")
    assert_rel_close(fast(x.to(memory_format=torch.channels_last), t, context).sample, expected, RTOL,
                     "channels-last UNet, channels-last input")


@torch.no_grad()
def test_channels_last_vae(models):
    _, vae, _, image = models
    expected_mean, expected_image = vae.encode(image).latent_dist.mean, vae(image).sample
    fast = to_channels_last(copy.deepcopy(vae))
    assert fast.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    image_cl = image.to(memory_format=torch.channels_last)
    assert_rel_close(fast.encode(image_cl).latent_dist.mean, expected_mean, RTOL, "channels-last VAE encode")
    assert_rel_close(fast(image_cl).sample, expected_image, RTOL, "channels-last VAE round trip")


@torch.no_grad()
def test_compiled_unet_matches_eager_aot_eager(models):
    unet, _, (x, t, context), _ = models
    expected = unet(x, t, context).sample
    compiled = copy.deepcopy(unet)
    names = compile_blocks(compiled, backend="aot_eager")
    # The tiny sd2 UNet (layers_per_block 1, three levels, attention in two): resnets 3 down + 2 mid
    # + 6 up = 11; one transformer block per attention: 2 down + 1 mid + 4 up = 7.
    assert len(names) == 18 and all("resnets" in n or "transformer_blocks" in n for n in names)
    assert_rel_close(compiled(x, t, context).sample, expected, RTOL, "compiled UNet (aot_eager)")
    # A second call with the same shapes reuses the compiled code; still the same answer.
    assert_rel_close(compiled(x, t, context).sample, expected, RTOL, "compiled UNet, second call")


@torch.no_grad()
def test_identical_blocks_share_one_graph():
    """Regional compilation's point: four identical CLIP layers compile once."""
    config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4)
    model = CLIPTextModel(config).eval()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = model(ids).last_hidden_state
    backend = CountingBackend()
    names = compile_blocks(model, backend=backend)
    assert names == [f"text_model.encoder.layers.{i}" for i in range(4)]
    out = model(ids).last_hidden_state
    assert len(backend.graphs) == 1  # one graph for the four layers
    assert_rel_close(out, expected, RTOL, "compiled CLIP layers")
    uncompile_blocks(model)
    model(torch.randint(0, 1000, (3, 5)))  # new shapes, but eager now: nothing is captured
    assert len(backend.graphs) == 1


@torch.no_grad()
def test_unet_blocks_share_graphs(models):
    unet, _, (x, t, context), _ = models
    compiled = copy.deepcopy(unet)
    backend = CountingBackend()
    names = compile_blocks(compiled, backend=backend)
    compiled(x, t, context)
    # 18 blocks; graphs are made per distinct shape / structure (widths, skip concatenations,
    # with or without a shortcut conv), fewer than one per block (measured: 9).
    assert len(backend.graphs) < len(names)
    assert torch._dynamo.config.recompile_limit >= 64


def test_compile_blocks_needs_blocks():
    with pytest.raises(ValueError, match="Found no blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pipeline"):
        compile_blocks(object())
    assert set(REPEATED_BLOCKS)  # the default block types are importable classes


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("tiny-compile"), flavour="sd1")
    p = StableDiffusionPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


CALL = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="pt")


def test_pipeline_runs_compiled_aot_eager(pipe):
    expected = pipe(generator=torch.Generator().manual_seed(0), **CALL).images
    compile_blocks(pipe, backend="aot_eager")  # UNet, VAE and CLIP blocks
    to_channels_last(pipe)
    try:
        images = pipe(generator=torch.Generator().manual_seed(0), **CALL).images
    finally:
        uncompile_blocks(pipe)
        for module in pipe._model_components().values():
            module.to(memory_format=torch.contiguous_format)
    assert_rel_close(images, expected, RTOL, "pipeline with compiled blocks (aot_eager) and channels-last")


@pytest.mark.filterwarnings("ignore:Offloading to device='cpu'")
def test_compiled_blocks_with_offload(pipe):
    """compile_blocks combines with model and group offload: same images, no recompilation when
    the hooks swap the weights between calls, and the hooks still fire (also the group hooks that
    sit on compiled CLIP layers). Sequential offload would hook modules inside compiled blocks,
    which compiled code never calls: refused."""
    expected = pipe(generator=torch.Generator().manual_seed(0), **CALL).images
    backend = CountingBackend()
    compile_blocks(pipe, backend=backend)
    try:
        pipe(generator=torch.Generator().manual_seed(0), **CALL)  # compiles
        compiled = len(backend.graphs)
        installs = {
            "unet": enable_model_cpu_offload,
            # a group whose hooks sit on a compiled CLIPEncoderLayer itself
            "text_encoder.text_model.encoder.layers[0]": lambda p, d: apply_group_offloading(p, d, use_stream=True),
        }
        for must_move, install in installs.items():
            install(pipe, "cpu")
            try:
                with OffloadTracer() as tracer:
                    images = pipe(generator=torch.Generator().manual_seed(0), **CALL).images
            finally:
                remove_offload(pipe)
            assert torch.equal(images, expected)
            assert len(backend.graphs) == compiled  # weights swapped, code reused
            assert must_move in {e.name for e in tracer.events if e.action == "onload"}
        with pytest.raises(ValueError, match="inside a module that was compiled"):
            enable_sequential_cpu_offload(pipe, "cpu")
        assert not hasattr(pipe, "_minidiff_offload") and pipe.device == torch.device("cpu")  # rolled back
    finally:
        uncompile_blocks(pipe)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_unet_matches_eager_inductor(models):
    unet, _, (x, t, context), _ = models
    expected = unet(x, t, context).sample
    compiled = copy.deepcopy(unet)
    compile_blocks(compiled)  # default backend: inductor (C++ on the CPU)
    assert_rel_close(compiled(x, t, context).sample, expected, INDUCTOR_RTOL, "compiled UNet (inductor)")


@pytest.mark.slow
def test_pipeline_runs_compiled_inductor(pipe):
    expected = pipe(generator=torch.Generator().manual_seed(0), **CALL).images
    compile_blocks(pipe)
    try:
        images = pipe(generator=torch.Generator().manual_seed(0), **CALL).images
    finally:
        uncompile_blocks(pipe)
    assert_rel_close(images, expected, INDUCTOR_RTOL, "pipeline with compiled blocks (inductor)")
