"""Drop-in conventions: what a diffusers / transformers user types works on minidiff, and gives
what the reference gives in the same situation (each test runs the reference beside minidiff).

    outputs      unet(...).sample, vae.encode(x).latent_dist, vae.decode(z).sample, CLIP outputs,
                 return_dict=False tuples
    dtypes       torch_dtype=None / "auto" / a dtype, per library (loading.resolve_dtype)
    pipelines    DiffusionPipeline.from_pretrained, .components, Pipeline(**components),
                 save_pretrained (diffusers loads it back, recommended_settings.json included), to /
                 device / dtype
    memory       enable_model_cpu_offload & co. as pipeline methods, attention slicing
    quantization PipelineQuantizationConfig at load, save and load back
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import minidiff
from minidiff import (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection,
                      DiffEditPipeline, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel)
from minidiff.reference import save_tiny_pipeline, tiny_unet, tiny_vae

SHAPES = Path(__file__).resolve().parents[1] / "weights" / "shapes"
# Same float32 arithmetic and kernels as the reference, up to summation order (see test_unet.py,
# test_vae.py, test_clip.py for the measured errors, ~1e-6); 1e-5 relative still fails on any
# real difference.
RTOL = 1e-5
# Whole images after a few sampling steps (see test_text_to_image.py): 1e-4 absolute.
IMAGE_ATOL = 1e-4


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def diffusers_pipe(folder, cls_name="StableDiffusionPipeline", **kw):
    import diffusers

    return quiet(getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False, **kw))


def image(pipe, **kw):
    kw = {**dict(prompt="a red circle", height=32, width=32, num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)), **kw}
    return pipe(**kw).images


# ----------------------------------------------------------------------------------------------
# Output objects


def assert_same_structure(ours, theirs, what, atol=1e-6):
    """`[0]` of the output object is the same tensor as the reference's `[0]`."""
    torch.testing.assert_close(ours[0], theirs[0], rtol=RTOL, atol=atol, msg=what)


def test_unet_output_like_diffusers(tmp_path):
    ref = tiny_unet("sd1")
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        a, b = ours(x, 10, encoder_hidden_states=c), ref(x, 10, encoder_hidden_states=c)
        torch.testing.assert_close(a.sample, b.sample, rtol=RTOL, atol=1e-6)
        assert_same_structure(a, b, "unet [0]")
        ta, tb = ours(x, 10, c, return_dict=False), ref(x, 10, c, return_dict=False)
    assert type(ta) is tuple and len(ta) == len(tb) == 1
    torch.testing.assert_close(ta[0], tb[0], rtol=RTOL, atol=1e-6)


def test_vae_outputs_like_diffusers(tmp_path):
    ref = tiny_vae()
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = ours.encode(x), ref.encode(x)
        for field in ("mean", "std", "var", "logvar"):
            torch.testing.assert_close(getattr(a.latent_dist, field), getattr(b.latent_dist, field), rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(a[0].mean, b[0].mean)
        torch.testing.assert_close(a.latent_dist.sample(torch.Generator().manual_seed(0)),
                                   b.latent_dist.sample(torch.Generator().manual_seed(0)), rtol=RTOL, atol=1e-6)
        assert len(ours.encode(x, return_dict=False)) == len(ref.encode(x, return_dict=False)) == 1
        z = a.latent_dist.mode()
        torch.testing.assert_close(ours.decode(z).sample, ref.decode(z).sample, rtol=RTOL, atol=1e-5)
        assert_same_structure(ours.decode(z), ref.decode(z), "decode [0]", atol=1e-5)
        da, db = ours.decode(z, return_dict=False), ref.decode(z, return_dict=False)
        assert type(da) is tuple and len(da) == len(db) == 1
        torch.testing.assert_close(ours(x).sample, ref(x).sample, rtol=RTOL, atol=1e-5)


def _tiny_transformers(cls_name):
    torch.manual_seed(0)
    if cls_name == "CLIPVisionModelWithProjection":
        config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8)
    else:
        config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=24,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                             bos_token_id=997, eos_token_id=998, pad_token_id=1)
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.parametrize("cls", [CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection],
                         ids=lambda c: c.__name__)
def test_clip_outputs_like_transformers(tmp_path, cls):
    ref = _tiny_transformers(cls.__name__)
    ref.save_pretrained(tmp_path)
    ours = cls.from_pretrained(tmp_path)
    if cls is CLIPVisionModelWithProjection:
        inputs = torch.randn(2, 3, 32, 32)
    else:
        inputs = torch.tensor([[997, 5, 6, 998, 1, 1], [997, 7, 998, 1, 1, 1]])
    fields = {"CLIPTextModel": ("last_hidden_state", "pooler_output"),
              "CLIPTextModelWithProjection": ("text_embeds", "last_hidden_state"),
              "CLIPVisionModelWithProjection": ("image_embeds", "last_hidden_state")}[cls.__name__]
    with torch.no_grad():
        for hidden in (False, True):
            a, b = ours(inputs, output_hidden_states=hidden), ref(inputs, output_hidden_states=hidden)
            for f in fields:
                torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=RTOL, atol=1e-5, msg=f)
                torch.testing.assert_close(a[f], b[f], rtol=RTOL, atol=1e-5, msg=f)
            torch.testing.assert_close(a[0], b[0], rtol=RTOL, atol=1e-5)
            assert (a.hidden_states is None) == (b.hidden_states is None)
            if hidden:
                assert len(a.hidden_states) == len(b.hidden_states)
                torch.testing.assert_close(a.hidden_states[-1], b.hidden_states[-1], rtol=RTOL, atol=1e-5)
            ta, tb = ours(inputs, output_hidden_states=hidden, return_dict=False), ref(
                inputs, output_hidden_states=hidden, return_dict=False)
            assert type(ta) is tuple and len(ta) == len(tb)
            torch.testing.assert_close(ta[0], tb[0], rtol=RTOL, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# dtypes at load


@pytest.mark.parametrize("subfolder, ours_cls, library", [
    ("unet", UNet2DConditionModel, "diffusers"), ("vae", AutoencoderKL, "diffusers"),
    ("text_encoder", CLIPTextModel, "transformers"), ("image_encoder", CLIPVisionModelWithProjection, "transformers"),
])
def test_torch_dtype_rule_matches_each_library(subfolder, ours_cls, library):
    """weights/shapes is stored in fp16. diffusers loads float32 by default, transformers 5 the
    file's dtype ("auto"); an explicit dtype wins in both."""
    import diffusers

    ref_cls = getattr(diffusers if library == "diffusers" else transformers, ours_cls.__name__)
    for kw in ({}, {"torch_dtype": torch.bfloat16}):
        ours = ours_cls.from_pretrained(SHAPES, subfolder=subfolder, **kw)
        ref = ref_cls.from_pretrained(SHAPES, subfolder=subfolder, **kw)
        assert ours.dtype == ref.dtype, (subfolder, kw)
    if library == "transformers":
        ref = ref_cls.from_pretrained(SHAPES, subfolder=subfolder, dtype="auto")
        assert ours_cls.from_pretrained(SHAPES, subfolder=subfolder, torch_dtype="auto").dtype == ref.dtype
        assert ours_cls.from_pretrained(SHAPES, subfolder=subfolder, dtype=torch.float32).dtype == torch.float32


def test_float32_vae_takes_float32_input_by_default():
    # The crash of the issue: the fp16 file kept its dtype, and a float32 image met fp16 biases.
    vae = AutoencoderKL.from_pretrained(SHAPES, subfolder="vae")
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.dtype == torch.float32


def test_pipeline_default_dtypes_run_where_diffusers_fails():
    """With torch_dtype=None the components take their libraries' defaults, as in diffusers:
    UNet and VAE float32, the text encoder fp16 (transformers 5's "auto"). diffusers' loop then
    stops on the mixed dtypes; minidiff casts the text states to the UNet's dtype and runs."""
    ref = diffusers_pipe(str(SHAPES))
    ours = quiet(StableDiffusionPipeline.from_pretrained(SHAPES))
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(ours, name).dtype == getattr(ref, name).dtype, name
    assert ours.text_encoder.dtype == torch.float16 and ours.unet.dtype == torch.float32
    with pytest.raises(RuntimeError, match="dtype"):
        ref("a red circle", num_inference_steps=1, output_type="np")
    out = ours("a red circle on a white background", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 128, 128, 3) and np.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# Pipelines: class from model_index.json, components, save, to


def test_diffusion_pipeline_picks_the_class(tmp_path):
    import diffusers

    sd = DiffusionPipeline.from_pretrained(SHAPES, torch_dtype=torch.float32)
    assert type(sd) is StableDiffusionPipeline
    assert type(diffusers.DiffusionPipeline.from_pretrained(SHAPES, torch_dtype=torch.float32)).__name__ == type(sd).__name__
    diffedit_folder = tmp_path / "diffedit"
    diffusers_pipe(str(SHAPES), "StableDiffusionDiffEditPipeline", torch_dtype=torch.float32).save_pretrained(diffedit_folder)
    assert type(DiffusionPipeline.from_pretrained(diffedit_folder)) is DiffEditPipeline
    assert minidiff.StableDiffusionDiffEditPipeline is DiffEditPipeline
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*StableDiffusionPipeline"):
        DiffusionPipeline.from_pretrained(unknown)


@pytest.mark.parametrize("ours_cls, ref_name", [(StableDiffusionPipeline, "StableDiffusionPipeline"),
                                                (DiffEditPipeline, "StableDiffusionDiffEditPipeline")])
def test_components_dict_like_diffusers(ours_cls, ref_name):
    ours = ours_cls.from_pretrained(SHAPES, torch_dtype=torch.float32)
    ref = diffusers_pipe(str(SHAPES), ref_name, torch_dtype=torch.float32)
    assert isinstance(ours.components, dict)
    assert set(ours.components) == set(ref.components)
    for name, value in ref.components.items():
        if name == "inverse_scheduler":
            # The folder has none. diffusers leaves None (and its invert() then fails); minidiff
            # builds DDIM-inverse from the scheduler's config.
            assert value is None and type(ours.inverse_scheduler).__name__ == "DDIMInverseScheduler"
            continue
        assert (ours.components[name] is None) == (value is None), name
    again = ours_cls(**ours.components)  # a second pipeline on the same weights
    assert again.unet is ours.unet and again.tokenizer is ours.tokenizer


def test_pipelines_built_from_each_others_components_fail_as_in_diffusers():
    import diffusers

    sd, de = (StableDiffusionPipeline.from_pretrained(SHAPES), DiffEditPipeline.from_pretrained(SHAPES))
    ref_sd = diffusers_pipe(str(SHAPES), torch_dtype=torch.float32)
    ref_de = diffusers_pipe(str(SHAPES), "StableDiffusionDiffEditPipeline", torch_dtype=torch.float32)
    for ours_call, ref_call in [(lambda: StableDiffusionPipeline(**de.components),
                                 lambda: diffusers.StableDiffusionPipeline(**ref_de.components)),
                                (lambda: DiffEditPipeline(**sd.components),
                                 lambda: diffusers.StableDiffusionDiffEditPipeline(**ref_sd.components))]:
        with pytest.raises(TypeError) as theirs:
            ref_call()
        with pytest.raises(TypeError) as mine:
            ours_call()
        # The same unexpected component named in both messages.
        assert str(theirs.value).split("argument ")[-1] == str(mine.value).split("argument ")[-1]


def test_save_pretrained_loads_back_in_diffusers(tiny, tmp_path):
    ours = quiet(StableDiffusionPipeline.from_pretrained(tiny))
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    ref = diffusers_pipe(str(tmp_path / "saved"))
    np.testing.assert_allclose(image(ours), image(ref), atol=IMAGE_ATOL, rtol=0)
    again = quiet(DiffusionPipeline.from_pretrained(tmp_path / "saved"))
    np.testing.assert_array_equal(image(again), image(ours))
    # Nothing of the user's is overwritten; a failed save leaves no half-written folder.
    with pytest.raises(FileExistsError, match="not empty"):
        ours.save_pretrained(tmp_path / "saved")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]


def test_diffusers_ignores_the_recommended_settings_file(tiny, tmp_path):
    """minidiff's recommended_settings.json (pipelines/settings.py) is an extra file beside
    model_index.json: diffusers loads such a folder as before and gives the same image (weights/shapes
    has one too, and the tests above load it in diffusers)."""
    import diffusers

    ours = quiet(StableDiffusionPipeline.from_pretrained(tiny))
    ours.recommended_settings = {"text_to_image": {"num_inference_steps": 3}}
    ours.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "recommended_settings.json").is_file()
    ref = diffusers_pipe(str(tmp_path / "saved"))
    np.testing.assert_allclose(image(ours), image(ref), atol=IMAGE_ATOL, rtol=0)
    assert "recommended_settings" not in dict(ref.config)
    assert type(diffusers.DiffusionPipeline.from_pretrained(SHAPES)).__name__ == "StableDiffusionPipeline"
    assert (SHAPES / "recommended_settings.json").is_file()

def test_to_device_dtype_like_diffusers(tiny):
    ours = StableDiffusionPipeline.from_pretrained(tiny)
    ref = diffusers_pipe(str(tiny))
    assert ours.device == ref.device and ours.dtype == ref.dtype
    for args, kwargs in [((torch.bfloat16,), {}), (("cpu", torch.float32), {}), ((), {"dtype": torch.bfloat16}),
                         ((), {"device": "cpu", "dtype": torch.float32})]:
        assert ours.to(*args, **kwargs) is ours
        ref.to(*args, **kwargs)
        assert (ours.device, ours.dtype, ours.vae.dtype) == (ref.device, ref.dtype, ref.vae.dtype), (args, kwargs)


def test_from_pretrained_takes_components_and_refuses_unknown_ones(tiny):
    from minidiff import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(tiny, scheduler=scheduler, safety_checker=None)
    assert pipe.scheduler is scheduler
    with pytest.raises(TypeError, match="unknown component"):
        StableDiffusionPipeline.from_pretrained(tiny, controlnet=None)
    with pytest.raises(ValueError, match="safety checker"):
        StableDiffusionPipeline(**{**pipe.components, "safety_checker": object()})


# ----------------------------------------------------------------------------------------------
# Memory methods


@pytest.mark.parametrize("enable", [
    lambda p: p.enable_model_cpu_offload(),
    lambda p: p.enable_sequential_cpu_offload(),
    lambda p: p.enable_group_offload("cpu", offload_type="block_level", num_blocks_per_group=1),
    lambda p: p.enable_group_offload("cpu", offload_type="leaf_level"),
    lambda p: p.enable_group_offload("cpu", offload_type="block_level", num_blocks_per_group=2, use_stream=True),
], ids=["model", "sequential", "group-block", "group-leaf", "group-stream"])
def test_offload_methods_give_the_same_images(tiny, enable):
    pipe = quiet(StableDiffusionPipeline.from_pretrained(tiny))
    expected = image(pipe)
    with pytest.warns(UserWarning, match="saves no memory"):  # CPU-only: the rehearsal of memory/offload
        enable(pipe)
    try:
        assert any(hasattr(m, "_minidiff_offload") for c in pipe._model_components().values() for m in c.modules())
        np.testing.assert_array_equal(image(pipe), expected)
    finally:
        pipe.remove_all_hooks()
    assert not any(hasattr(m, "_minidiff_offload") for c in pipe._model_components().values() for m in c.modules())
    pipe.reset_device_map()
    np.testing.assert_array_equal(image(pipe), expected)


def test_group_offload_arguments_are_checked(tiny):
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    with pytest.raises(ValueError, match="num_blocks_per_group"):
        pipe.enable_group_offload("cpu")
    with pytest.raises(ValueError, match="offload_type"):
        pipe.enable_group_offload("cpu", offload_type="layer")
    with pytest.raises(ValueError, match="not supported"):
        pipe.enable_group_offload("cpu", num_blocks_per_group=1, offload_to_disk_path="/tmp/x")


@pytest.mark.parametrize("slice_size", ["auto", "max", 1])
def test_attention_slicing_matches_diffusers(tiny, slice_size):
    ours, ref = quiet(StableDiffusionPipeline.from_pretrained(tiny)), diffusers_pipe(str(tiny))
    plain = image(ours)
    ours.enable_attention_slicing(slice_size)
    ref.enable_attention_slicing(slice_size)
    sliced = image(ours)
    np.testing.assert_allclose(sliced, image(ref), atol=IMAGE_ATOL, rtol=0)
    np.testing.assert_allclose(sliced, plain, atol=1e-5, rtol=0)  # slicing changes only the summation order
    ours.disable_attention_slicing()
    assert all(getattr(m, "slice_size", None) is None for m in ours.unet.modules())


def test_vae_slicing_and_tiling_methods_match_diffusers(tiny):
    """The reference documents call pipe.enable_vae_slicing() / enable_vae_tiling(); diffusers 0.42
    has removed those pipeline methods (only vae.enable_slicing() / enable_tiling() are left), and
    minidiff keeps them, so the documents' code runs. Compared with diffusers' VAE switches."""
    ours, ref = quiet(StableDiffusionPipeline.from_pretrained(tiny)), diffusers_pipe(str(tiny))
    assert not hasattr(ref, "enable_vae_slicing")
    for ours_method, ref_method in (("enable_vae_slicing", "enable_slicing"), ("enable_vae_tiling", "enable_tiling")):
        getattr(ours, ours_method)()
        getattr(ref.vae, ref_method)()
        np.testing.assert_allclose(image(ours, prompt=["a", "b"], height=96, width=96),
                                   image(ref, prompt=["a", "b"], height=96, width=96), atol=IMAGE_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Quantization at load


def nf4_config(**kw):
    from minidiff.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32, **kw},
        components_to_quantize=["unet", "text_encoder"])


def test_quantization_config_swaps_every_linear_exactly(tiny):
    """Every nn.Linear of the named components becomes LinearNF4 (bitsandbytes' Linear4bit swaps
    every Linear under diffusers' BitsAndBytesConfig; diffusers 0.42 refuses to quantize without a
    GPU, so the reference here is the float pipeline with W := dequantize(quantize(W)))."""
    from minidiff.memory.nf4 import LinearNF4, dequantize_nf4

    plain = quiet(StableDiffusionPipeline.from_pretrained(tiny))
    linears = {c: [n for n, m in getattr(plain, c).named_modules() if type(m) is torch.nn.Linear]
               for c in ("unet", "text_encoder")}
    quant = quiet(StableDiffusionPipeline.from_pretrained(tiny, quantization_config=nf4_config()))
    for c, names in linears.items():
        assert names and all(isinstance(getattr(quant, c).get_submodule(n), LinearNF4) for n in names), c
    assert not any(isinstance(m, LinearNF4) for m in quant.vae.modules())
    with torch.no_grad():
        for c, names in linears.items():
            for n in names:
                layer = getattr(plain, c).get_submodule(n)
                layer.weight.copy_(dequantize_nf4(getattr(quant, c).get_submodule(n).quant_state).view_as(layer.weight))
    np.testing.assert_allclose(image(quant), image(plain), atol=1e-5, rtol=0)


def test_quantized_pipeline_saves_and_loads_back(tiny, tmp_path):
    from minidiff.memory.nf4 import LinearNF4

    quant = quiet(StableDiffusionPipeline.from_pretrained(tiny, quantization_config=nf4_config(bnb_4bit_use_double_quant=True)))
    quant.save_pretrained(tmp_path / "nf4")
    config = json.loads((tmp_path / "nf4" / "unet" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "minidiff_nf4"
    again = quiet(DiffusionPipeline.from_pretrained(tmp_path / "nf4"))
    assert isinstance(again.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, LinearNF4)
    np.testing.assert_array_equal(image(again), image(quant))


def test_quantization_config_refuses_what_it_cannot_do():
    from minidiff.quantizers import PipelineQuantizationConfig

    with pytest.raises(ValueError, match="not available"):
        PipelineQuantizationConfig(quant_backend="gguf")
    with pytest.raises(ValueError, match="nf4"):
        PipelineQuantizationConfig(quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"})
    with pytest.raises(ValueError, match="not supported"):
        PipelineQuantizationConfig(quant_kwargs={"load_in_8bit": True})
