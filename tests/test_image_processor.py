"""minidiff's CLIPImageProcessor against transformers' CLIPImageProcessor.

Which transformers class is the reference (transformers 5.x):
    `transformers.CLIPImageProcessor`, the default, is the torchvision backend. Without torchvision
    (this project's test environment) it falls back, with a warning, to `CLIPImageProcessorPil`.
    `CLIPImageProcessorPil` is the PIL/numpy backend, the arithmetic of transformers 4.x.
minidiff reproduces the PIL backend, so against it the tolerance is 0: the same PIL resize on the
same 8-bit pixels, the same crop offsets, the same float64 rescale and float32 normalisation.
The default class is tested too, whichever it is. When it is the torchvision one, the tolerance is
the 2 grey levels its own bicubic filter differs by (TORCHVISION_ATOL).

Test images are a gradient plus per-pixel noise, so a wrong filter, size or one-pixel crop shift
changes the result (the negative controls below check that it would).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from minidiff.errors import InputError, NonFiniteError
from minidiff.image_processor import OPENAI_CLIP_STD, CLIPImageProcessor

transformers = pytest.importorskip("transformers")
# transformers 5's name for the PIL backend; in 4.x CLIPImageProcessor itself was that one.
CLIPImageProcessorPil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)

ROOT = Path(__file__).resolve().parents[1]
SHAPES_FOLDER = ROOT / "weights" / "shapes"

# The OpenAI CLIP ViT-L/14 preprocessor config in its two spellings. Older files (the
# openai/clip-vit-large-patch14 repo) write plain ints; newer ones (SD 1.x's feature_extractor/,
# re-saved pipelines) write dicts. minidiff/data has no copy of kandinsky-2-2-prior's
# image_processor/preprocessor_config.json, so these stand in for the official 224 px config.
CLIP_224_LEGACY = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
CLIP_224 = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
# Not CLIP's, but they exercise the rounding rules: an odd crop difference on both axes, and a crop
# larger than the resized image (zero padding by an odd number of pixels).
ODD_CROP = {"size": {"shortest_edge": 101}, "crop_size": {"height": 64, "width": 77}}
PADDED = {"size": {"shortest_edge": 60}, "crop_size": {"height": 99, "width": 70}}

# One grey level after normalisation is 1 / (255 * std); the torchvision backend's bicubic moves
# 0.1-1 % of the values by 1, rarely 2, levels against PIL's (measured with torchvision 0.28:
# max 2 levels = 0.030, mean |diff| <= 1.5e-4). Its padding differs by one pixel, so PADDED is left out.
GREY_LEVEL = 1 / (255 * min(OPENAI_CLIP_STD))
TORCHVISION_ATOL = 2 * GREY_LEVEL + 1e-6

# (width, height, mode): square, both orientations, tiny (upscaled), large (downscaled), odd sizes.
CASES = [(128, 128, "RGB"), (200, 100, "RGB"), (100, 333, "RGB"), (37, 64, "RGB"), (640, 480, "RGB"),
         (129, 131, "RGB"), (150, 120, "RGBA"), (150, 120, "L")]
CASE_IDS = [f"{w}x{h}-{m}" for w, h, m in CASES]


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    """A diagonal gradient plus noise (and random alpha for RGBA)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = ((xx * 7 + yy * 3) % 256)[..., None] * 0.7
    x = np.clip(gradient + rng.integers(0, 77, (height, width, 4)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        x[..., 3] = rng.integers(0, 256, (height, width))
        return PIL.Image.fromarray(x, "RGBA")
    return PIL.Image.fromarray(x[..., 0], "L") if mode == "L" else PIL.Image.fromarray(x[..., :3], "RGB")


def shapes_config() -> dict:
    return json.loads((SHAPES_FOLDER / "image_encoder" / "preprocessor_config.json").read_text())


CONFIGS = {"shapes-128": shapes_config, "clip-224-legacy": lambda: CLIP_224_LEGACY, "clip-224": lambda: CLIP_224,
           "odd-crop": lambda: ODD_CROP, "padded": lambda: PADDED}


def pixels(processor, images, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' fallback notice; minidiff's rescale warning
        return processor(images=images, return_tensors="pt", **kwargs).pixel_values


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_pixel_values_equal_transformers_pil_backend(config_name, case):
    """Bit for bit (atol = rtol = 0; measured max error 0 in every case)."""
    config = CONFIGS[config_name]()
    w, h, mode = case
    images = [make_image(w, h, mode, seed=0), make_image(w, h, mode, seed=1)]
    ours = pixels(CLIPImageProcessor(**config), images)
    ref = pixels(CLIPImageProcessorPil(**config), images)
    crop = CLIPImageProcessor(**config).crop_size
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, crop["height"], crop["width"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("config_name", ["shapes-128", "clip-224", "odd-crop"])
def test_pixel_values_match_the_default_transformers_class(config_name):
    """`transformers.CLIPImageProcessor` as a user gets it. Without torchvision it is the PIL
    backend (tolerance 0); with torchvision, see TORCHVISION_ATOL."""
    config = CONFIGS[config_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = transformers.CLIPImageProcessor(**config)
    exact = getattr(default, "backend", "pil") == "pil"
    for w, h, mode in CASES:
        image = make_image(w, h, mode)
        ours, ref = pixels(CLIPImageProcessor(**config), image), pixels(default, image)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0 if exact else TORCHVISION_ATOL)
        assert (ours - ref).abs().mean() <= (0 if exact else 1e-3)


def test_arrays_and_tensors_equal_transformers():
    """uint8 (H, W, C) / (C, H, W) numpy and torch, a 4-D batch, RGBA and grey arrays, floats:
    each against transformers' PIL backend, bit for bit."""
    config = shapes_config()
    ours, ref = CLIPImageProcessor(**config), CLIPImageProcessorPil(**config)
    u8 = np.array(make_image(200, 100))  # (H, W, 3)
    inputs = {
        "numpy HWC": u8, "numpy CHW": np.ascontiguousarray(u8.transpose(2, 0, 1)),
        "torch CHW": torch.from_numpy(u8).permute(2, 0, 1), "numpy batch": np.stack([u8, u8[::-1]]),
        "numpy RGBA": np.array(make_image(150, 120, "RGBA")), "numpy grey": np.array(make_image(150, 120, "L"))[..., None],
        # Both ends could be channels: transformers takes the first axis, (C, H, W) = (3, 40, 3).
        "ambiguous (3, 40, 3)": np.ascontiguousarray(u8[:3, :40, :3]),
        "float 0..255": u8.astype(np.float32), "float [0, 1]": torch.rand(3, 90, 70, generator=torch.Generator().manual_seed(0)),
    }
    for name, x in inputs.items():
        torch.testing.assert_close(pixels(ours, x), pixels(ref, x), rtol=0, atol=0, msg=name)
    # Floats in [0, 1] are rescaled a second time, as in transformers; minidiff warns about it.
    with pytest.warns(UserWarning, match="do_rescale=False"):
        ours(images=u8 / 255.0, return_tensors="pt")
    x = (u8 / 255.0).astype(np.float32)
    torch.testing.assert_close(pixels(ours, x, do_rescale=False), pixels(ref, x, do_rescale=False), rtol=0, atol=0)


@pytest.mark.parametrize("settings", [dict(do_resize=False), dict(do_center_crop=False), dict(do_normalize=False),
                                      dict(resample=2), dict(size=160), dict(size={"height": 90, "width": 140})],
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_per_call_settings_equal_transformers(settings):
    config = shapes_config()
    image = make_image(200, 100)
    # return_tensors=None (lists of arrays): without the centre crop nothing could be stacked.
    ours = CLIPImageProcessor(**config)(images=image, **settings).pixel_values
    ref = CLIPImageProcessorPil(**config)(images=image, **settings).pixel_values
    ours, ref = (torch.as_tensor(np.stack(list(p))).float() for p in (ours, ref))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_output_size_truncates_and_crop_offset_floors():
    """The facts behind the parity, stated on their own (each would fail if rounded the other way)."""
    p = CLIPImageProcessor(**shapes_config())
    # output_size takes and returns (height, width).
    assert p.output_size(64, 37) == (221, 128)  # 128 * 64 / 37 = 221.4
    assert p.output_size(100, 333) == (128, 426)  # 128 * 333 / 100 = 426.24
    assert p.output_size(7, 4) == (224, 128)  # 128 * 7 / 4 = 224 exactly
    assert p.output_size(128, 128) == (128, 128)  # already the size: PIL returns a copy
    assert CLIPImageProcessor(size=100).output_size(3, 5) == (100, 166)  # 166.67: truncated, not rounded to 167
    assert CLIPImageProcessor(size=128).output_size(3, 8) == (128, 341)  # 341.33
    # Centre crop of an odd difference: 5 rows -> 2 at the top, 3 at the bottom.
    x = np.arange(10 * 4 * 3).reshape(10, 4, 3)
    crop = CLIPImageProcessor(crop_size={"height": 5, "width": 4}).center_crop(x)
    assert (crop == x[2:7]).all()
    # Zero padding by an odd amount: the extra row goes on top (ceil of half).
    padded = CLIPImageProcessor(crop_size={"height": 4, "width": 3}).center_crop(np.ones((1, 3, 3)))
    assert padded[:, :, 0].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]]


def test_negative_controls():
    """The parity tests can fail: a different filter, a one-pixel shift or another rounding of the
    size changes the result far beyond their tolerances."""
    config = shapes_config()
    image = make_image(200, 100)
    ref = pixels(CLIPImageProcessorPil(**config), image)
    bilinear = pixels(CLIPImageProcessor(**config), image, resample=2)
    assert (bilinear - ref).abs().max() > 10 * TORCHVISION_ATOL
    assert (ref.roll(1, dims=-1) - ref).abs().max() > 10 * TORCHVISION_ATOL
    # A 3x5 image at shortest edge 100: 500 / 3 = 166.67, which transformers truncates. Rounding
    # would give 167; the size minidiff computes must be transformers' one.
    image = make_image(3, 5)
    theirs = CLIPImageProcessorPil(**config)(images=image, size=100, do_center_crop=False).pixel_values[0]
    ours = CLIPImageProcessor(**config)(images=image, size=100, do_center_crop=False).pixel_values[0]
    assert theirs.shape == ours.shape == (3, 166, 100)


# ----------------------------------------------------------------------------------------------
# Config files


def test_config_attributes_and_loading(tmp_path):
    shapes = CLIPImageProcessor.from_pretrained(SHAPES_FOLDER, subfolder="image_encoder")
    assert (shapes.size, shapes.crop_size, shapes.resample) == ({"shortest_edge": 128}, {"height": 128, "width": 128}, 3)
    assert shapes.do_resize and shapes.do_center_crop and shapes.do_rescale and shapes.do_normalize
    assert shapes.rescale_factor == 1 / 255 and shapes.image_std == list(OPENAI_CLIP_STD)
    # The legacy int spelling is read as transformers reads it.
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "preprocessor_config.json").write_text(json.dumps(CLIP_224_LEGACY))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bookkeeping keys (feature_extractor_type) are no warning
        legacy = CLIPImageProcessor.from_pretrained(tmp_path / "legacy")
    ref = CLIPImageProcessorPil.from_pretrained(tmp_path / "legacy")
    assert legacy.size == dict(ref.size) == {"shortest_edge": 224}
    assert legacy.crop_size == dict(ref.crop_size) == {"height": 224, "width": 224}
    # A pipeline folder without subfolder= says which one to use.
    with pytest.raises(FileNotFoundError, match="subfolder='image_encoder'"):
        CLIPImageProcessor.from_pretrained(SHAPES_FOLDER)


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    ours = CLIPImageProcessor(**ODD_CROP, resample=2)
    ours.save_pretrained(tmp_path / "ours")
    theirs = CLIPImageProcessorPil.from_pretrained(tmp_path / "ours")
    image = make_image(200, 100)
    torch.testing.assert_close(pixels(ours, image), pixels(theirs, image), rtol=0, atol=0)
    # ... and the other way: a file transformers wrote loads to the same settings.
    theirs.save_pretrained(tmp_path / "theirs")
    assert CLIPImageProcessor.from_pretrained(tmp_path / "theirs").to_dict() == ours.to_dict()
    saved = json.loads((tmp_path / "ours" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CLIPImageProcessor" and saved["crop_size"] == {"height": 64, "width": 77}


def test_output_object():
    p = CLIPImageProcessor(**shapes_config())
    out = p(images=[make_image(40, 30)] * 3, return_tensors="pt")
    assert out["pixel_values"] is out.pixel_values and out.to(torch.float64).pixel_values.dtype == torch.float64
    assert isinstance(p(images=make_image(40, 30), return_tensors="np").pixel_values, np.ndarray)
    listed = p(images=make_image(40, 30)).pixel_values  # return_tensors=None: transformers' list of arrays
    assert isinstance(listed, list) and listed[0].shape == (3, 128, 128) and listed[0].dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("call, match", [
    (lambda p: p(images=[]), "empty list"),
    (lambda p: p(images=np.zeros((0, 8, 8, 3), np.uint8)), "empty batch"),
    (lambda p: p(images="photo.png"), "PIL.Image.open"),
    (lambda p: p(images=3), "PIL images, numpy arrays or torch tensors"),
    (lambda p: p(images=[make_image(8, 8), {"pixels": 1}]), "got dict"),
    (lambda p: p(images=np.zeros((8, 8, 5), np.uint8)), "C = 1, 3 or 4"),
    (lambda p: p(images=np.zeros((8, 8, 3), bool)), "must hold numbers"),
    (lambda p: p(images=torch.rand(3, 8, 8) * 2 - 1), r"\(x \+ 1\) / 2"),
    (lambda p: p(images=make_image(8, 8), return_tensors="tf"), "return_tensors"),
    (lambda p: p(images=make_image(8, 8), sharpen=True), "Unknown CLIPImageProcessor setting"),
    (lambda p: p(images=[make_image(8, 8), make_image(9, 8)], do_center_crop=False, return_tensors="pt"), "different sizes"),
    (lambda p: p(images=make_image(8, 8, "RGBA"), do_convert_rgb=False), "do_convert_rgb=True"),
    (lambda p: CLIPImageProcessor(size={"longest_edge": 10}), "size must be"),
    (lambda p: CLIPImageProcessor(crop_size={"shortest_edge": 10}), "crop_size must be"),
    (lambda p: CLIPImageProcessor(size=0), "positive whole number"),
    (lambda p: CLIPImageProcessor(resample=9), "resample"),
    (lambda p: CLIPImageProcessor(image_std=[0.2, 0, 0.2]), "positive"),
    (lambda p: CLIPImageProcessor(image_mean=[0.5, 0.5]), "3 finite numbers"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_one_sentence(call, match):
    p = CLIPImageProcessor(**shapes_config())
    with pytest.raises(InputError, match=match) as err:
        call(p)
    message = str(err.value)
    assert "\n" not in message and message.endswith(".")


def test_non_finite_images_are_refused():
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        CLIPImageProcessor()(images=np.full((8, 8, 3), np.nan, np.float32))
