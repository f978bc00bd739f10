"""CLIP's image preprocessing: what transformers' `CLIPImageProcessor` does to an image before the
CLIP vision tower (the Kandinsky prior's image encoder, the shapes model's) sees it.

    1. RGB          PIL: an image with transparency is laid over white, anything else goes
                    through `convert("RGB")` (L is repeated into 3 channels, P looked up, ...).
                    Arrays: 1 channel repeated, 4 channels laid over white, 3 kept.
    2. resize       the short side to size["shortest_edge"] (224 for OpenAI CLIP, 128 for the
                    shapes model), the long side to floor(shortest_edge * long / short), truncated,
                    not rounded (37x64 -> 128x221). PIL's `Image.resize` on 8-bit pixels with
                    `resample` (3 = bicubic). The result is 8-bit again, so it is bit-exact only
                    through the same PIL call.
    3. centre crop  to crop_size (h, w): top = (H - h) // 2, left = (W - w) // 2. When the difference
                    is odd, the extra row (column) is cut at the bottom (right). An image smaller
                    than the crop is zero-padded, with the odd pixel of padding at the top (left).
    4. rescale      x * rescale_factor (1/255) computed in float64, then stored as float32
    5. normalise    (x - image_mean) / image_std per channel, in float32 (OpenAI CLIP's training
                    statistics)

`processor(images=..., return_tensors="pt").pixel_values` is (B, 3, h, w) float32, as in
transformers. With return_tensors=None it is a list of (3, h, w) numpy arrays, and "np" stacks them.

Which transformers class this is (transformers 5.x):
    `transformers.CLIPImageProcessor` is the torchvision backend. Without torchvision it falls back
    to `CLIPImageProcessorPil` with a warning. `use_fast` is deprecated in favour of
    backend="pil" | "torchvision".
    `CLIPImageProcessorPil` is the PIL/numpy backend, the arithmetic transformers 4.x used. This
    file reproduces it exactly.
    The torchvision backend resizes uint8 tensors with torch's antialiased bicubic. That is close
    to PIL's filter but not the same: some pixels move by a grey level or two (measured in
    tests/test_image_processor.py). Its zero padding puts the odd pixel at the bottom (right).
    Both write `"image_processor_type": "CLIPImageProcessor"` into preprocessor_config.json. A
    pipeline's model_index.json may name either class, and minidiff loads both as this class.

Arrays and tensors follow transformers' layout rules: (H, W, C) or (C, H, W) with C in {1, 3, 4}
(channels first when both ends could be channels), a 4-D batch, and here also a 2-D grey image.
uint8 (or integer-valued floats in 0..255) match PIL images pixel for pixel. Floats in [0, 1] are
what transformers does with them: truncated to 8 bits for PIL's resize and divided by 255 again
afterwards. With do_rescale=True they are then rescaled a second time, which is almost never meant,
so a warning says to pass do_rescale=False.

Reference for the behaviour (read, not copied): transformers 5.24 image_processing_pil_clip.py,
image_processing_backends.py (PilBackend), image_transforms.py (resize, center_crop, rescale,
normalize, convert_to_rgb), image_processing_utils.py (get_size_dict).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from minidiff.errors import InputError, NonFiniteError
from minidiff.loading import read_json, resolve_folder, write_json

CONFIG_NAME = "preprocessor_config.json"

# OpenAI CLIP's training-set statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# `resample` is PIL's filter number, the numbering transformers' PILImageResampling copies.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Keys of a preprocessor_config.json that record where the file came from and change nothing.
BOOKKEEPING_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class", "_processor_class",
                    "image_processor_class", "backend"}

# The settings, in the order transformers writes them (sorted on disk anyway).
SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")


@dataclass
class ImageProcessorOutput:
    """transformers' BatchFeature, reduced to what CLIP reads: `pixel_values`, (B, 3, h, w)."""

    pixel_values: Any

    def __getitem__(self, key: str):
        if key != "pixel_values":
            raise KeyError(f"{key!r}: an image processor's output has only 'pixel_values'.")
        return self.pixel_values

    def keys(self):
        return ["pixel_values"]

    def to(self, *args, **kwargs) -> "ImageProcessorOutput":
        """`.to(device)` / `.to(dtype)` as on a tensor (only for return_tensors="pt")."""
        if not isinstance(self.pixel_values, torch.Tensor):
            raise InputError("`.to(...)` needs tensors; call the processor with return_tensors=\"pt\".")
        return ImageProcessorOutput(self.pixel_values.to(*args, **kwargs))


# ----------------------------------------------------------------------------------------------
# Settings: sizes, statistics and filters in the forms preprocessor_config.json files use


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{what} must be a positive whole number of pixels; got {value!r}.")
    return int(value)


def _size_dict(value, what: str, int_means: str) -> dict:
    """An int, (h, w) or a dict -> {"shortest_edge": n} or {"height": h, "width": w}.

    Older configs (openai/clip-vit-large-patch14) write plain ints. For CLIP, transformers reads
    `size: 224` as the shortest edge and `crop_size: 224` as a 224x224 square; `int_means` says
    which.
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = _positive_int(value, what)
        return {"shortest_edge": n} if int_means == "shortest_edge" else {"height": n, "width": n}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": _positive_int(value[0], what), "width": _positive_int(value[1], what)}
    if isinstance(value, dict) and set(value) == {"shortest_edge"} and what == "size":
        return {"shortest_edge": _positive_int(value["shortest_edge"], what)}
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return {"height": _positive_int(value["height"], what), "width": _positive_int(value["width"], what)}
    allowed = "{'shortest_edge': n} or {'height': h, 'width': w}" if what == "size" else "{'height': h, 'width': w}"
    raise InputError(f"{what} must be {allowed} (or an int); got {value!r}.")


def _channel_stats(value, what: str) -> list[float]:
    """image_mean / image_std: one number for all channels, or one per RGB channel."""
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise InputError(f"{what} must be 3 finite numbers (one per RGB channel); got {value!r}.")
    if what == "image_std" and any(v <= 0 for v in values):
        raise InputError(f"image_std must be positive (it divides); got {values}.")
    return [float(v) for v in values]


# ----------------------------------------------------------------------------------------------
# Inputs: any supported image -> (H, W, C) numpy array


def _describe(item) -> str:
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return f"{type(item).__name__} of shape {tuple(item.shape)} and dtype {item.dtype}"
    return type(item).__name__


def _split_batch(images) -> list:
    """One image, a list/tuple of images, or a 4-D batch -> a flat list of single images."""
    if isinstance(images, (list, tuple)):
        items = list(images)
        if not items:
            raise InputError("`images` is an empty list; pass at least one image.")
    else:
        items = [images]
    flat = []
    for item in items:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu()
            item = (item.float() if item.dtype == torch.bfloat16 else item).numpy()  # numpy has no bfloat16
        if isinstance(item, np.ndarray) and item.ndim == 4:
            flat.extend(item)  # (B, ...) -> B images
        else:
            flat.append(item)
    if not flat:
        raise InputError("`images` holds no image (an empty batch); pass at least one image.")
    return flat


def _channels_last(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (H, W, C). transformers' rule: channels first when the
    first axis could be channels (1, 3 or 4), even when the last one could be too."""
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        return array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        return array
    raise InputError(f"An image array must be (H, W), (H, W, C) or (C, H, W) with C = 1, 3 or 4 (or a 4-D batch "
                     f"of those); got shape {tuple(array.shape)}.")


def _pil_to_array(image: PIL.Image.Image, do_convert_rgb: bool) -> np.ndarray:
    """Step 1 for PIL images -> (H, W, C) uint8."""
    if not do_convert_rgb:
        return _channels_last(np.array(image))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Transparent pixels become white, not whatever colour their RGB holds (often black).
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def _array_to_rgb(x: np.ndarray) -> np.ndarray:
    """Step 1 for arrays (H, W, C): grey repeated, RGBA laid over white (in the array's dtype)."""
    if x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    if x.shape[-1] == 4:
        floating = np.issubdtype(x.dtype, np.floating)
        if floating and (x.min() < 0 or x.max() > 1):
            raise InputError(f"A float RGBA image must hold values in [0, 1]; got [{x.min():.4g}, {x.max():.4g}].")
        white = 1.0 if floating else 255
        alpha = x[..., 3:] / white
        rgb = alpha * x[..., :3] + (1 - alpha) * white
        return rgb.astype(x.dtype) if floating else np.round(rgb).astype(x.dtype)  # integers rounded to nearest
    return x


def _to_array(item, do_convert_rgb: bool) -> np.ndarray:
    """One image (PIL, numpy or torch; see the module docstring) -> (H, W, 3) numpy array."""
    if isinstance(item, PIL.Image.Image):
        x = _pil_to_array(item, do_convert_rgb)
    elif isinstance(item, np.ndarray):
        numeric = np.issubdtype(item.dtype, np.integer) or np.issubdtype(item.dtype, np.floating)
        if item.dtype == np.bool_ or not numeric:
            raise InputError(f"An image array must hold numbers (uint8 0..255, or floats); got dtype {item.dtype}.")
        if np.issubdtype(item.dtype, np.floating) and not np.isfinite(item).all():
            raise NonFiniteError("The image holds NaN or inf values; an image must be finite.")
        x = _channels_last(item)
        x = _array_to_rgb(x) if do_convert_rgb else x
    else:
        hint = " (open a file first: PIL.Image.open(path))" if isinstance(item, (str, os.PathLike)) else ""
        raise InputError(f"CLIPImageProcessor takes PIL images, numpy arrays or torch tensors; got "
                         f"{_describe(item)}{hint}.")
    if x.shape[-1] != 3:
        raise InputError(f"After the RGB step the image has {x.shape[-1]} channels, but CLIP needs 3; keep "
                         f"do_convert_rgb=True, or pass RGB images.")
    return x


def _pil_ready(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """The 8-bit pixels PIL's resize works on, and whether they were scaled up from [0, 1].

    transformers' rule: integers, or floats that are whole numbers, must lie in 0..255 and are
    used as they are. Other floats must lie in [0, 1] and are multiplied by 255 (float64, stored
    as float32), then truncated to uint8."""
    if x.dtype == np.uint8:
        return x, False
    whole = np.allclose(x, x.astype(np.int64))
    if whole and x.min() >= 0 and x.max() <= 255:
        return x.astype(np.uint8), False
    if not whole and x.min() >= 0 and x.max() <= 1:
        return (x.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    raise InputError(f"To resize it, an image must hold 0..255 or floats in [0, 1]; got [{x.min():.4g}, "
                     f"{x.max():.4g}]. A tensor in [-1, 1] (the VAE's range) becomes [0, 1] with (x + 1) / 2.")


# ----------------------------------------------------------------------------------------------
# The processor


class CLIPImageProcessor:
    """transformers' CLIPImageProcessor (the PIL backend): RGB, resize, centre crop, rescale,
    normalise. Settings have transformers' names and defaults (OpenAI CLIP at 224 px)."""

    def __init__(self, do_resize: bool = True, size=None, resample: int = 3, do_center_crop: bool = True,
                 crop_size=None, do_rescale: bool = True, rescale_factor: float = 1 / 255,
                 do_normalize: bool = True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 do_convert_rgb: bool = True, **unused):
        self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
        self.do_rescale, self.do_normalize = bool(do_rescale), bool(do_normalize)
        self.do_convert_rgb = bool(do_convert_rgb)
        self.size = _size_dict(224 if size is None else size, "size", int_means="shortest_edge")
        self.crop_size = _size_dict(224 if crop_size is None else crop_size, "crop_size", int_means="square")
        if int(resample) not in RESAMPLE_NAMES:
            raise InputError(f"resample must be one of PIL's filters {RESAMPLE_NAMES} (3 = bicubic, CLIP's); "
                             f"got {resample!r}.")
        self.resample = int(resample)
        if not (isinstance(rescale_factor, (int, float)) and math.isfinite(rescale_factor) and rescale_factor > 0):
            raise InputError(f"rescale_factor must be a positive number (1/255 maps 0..255 to [0, 1]); "
                             f"got {rescale_factor!r}.")
        self.rescale_factor = float(rescale_factor)
        self.image_mean = _channel_stats(image_mean, "image_mean")
        self.image_std = _channel_stats(image_std, "image_std")
        unknown = sorted(k for k in unused if k not in BOOKKEEPING_KEYS)
        if unknown:
            # A config key minidiff does not implement (do_pad, ...) may change the result: say so.
            warnings.warn(f"CLIPImageProcessor: ignoring settings minidiff does not use: {unknown}.", stacklevel=2)

    # ------------------------------------------------------------------------------------------
    # preprocessor_config.json

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = None,
                        local_files_only: bool | None = None, revision: str | None = None,
                        **overrides) -> "CLIPImageProcessor":
        """Read preprocessor_config.json from a folder (or hub repo), as transformers does:
        the folder itself, or `subfolder="image_processor"` of a Kandinsky prior pipeline
        (`"image_encoder"` in the shapes model, `"feature_extractor"` in SD 1.x). Keyword
        arguments override the file's settings."""
        folder = resolve_folder(path_or_repo_id, subfolder, allow_patterns=[CONFIG_NAME],
                                local_files_only=local_files_only, revision=revision)
        if not (folder / CONFIG_NAME).is_file():
            inside = [d for d in ("image_processor", "feature_extractor", "image_encoder")
                      if (folder / d / CONFIG_NAME).is_file()]
            hint = f" It is a pipeline folder: pass subfolder={inside[0]!r}." if inside else ""
            raise FileNotFoundError(f"{str(folder)!r} has no {CONFIG_NAME}.{hint}")
        return cls(**{**read_json(folder, CONFIG_NAME), **overrides})

    def to_dict(self) -> dict:
        """The settings as transformers writes them in preprocessor_config.json."""
        return {"image_processor_type": "CLIPImageProcessor", **{k: getattr(self, k) for k in SETTINGS}}

    @property
    def config(self) -> dict:
        return self.to_dict()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `save_directory/preprocessor_config.json`, which transformers loads back."""
        folder = Path(save_directory)
        if folder.is_file():
            raise FileExistsError(f"{str(folder)!r} is a file; save_pretrained needs a folder.")
        folder.mkdir(parents=True, exist_ok=True)
        write_json(self.to_dict(), folder / CONFIG_NAME)

    def __repr__(self) -> str:
        return f"CLIPImageProcessor({', '.join(f'{k}={getattr(self, k)!r}' for k in SETTINGS)})"

    # ------------------------------------------------------------------------------------------
    # Steps 2 and 3 (steps 1, 4, 5 are in preprocess_one)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Step 2's (height, width) for an input of height x width."""
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        # floor, as transformers' int(target * long / short): 37x64 -> 128x221 (not 222). Integer
        # arithmetic gives the same number without a float in between.
        new_long = target * long // short
        return (new_long, target) if width <= height else (target, new_long)

    def resize(self, x: np.ndarray) -> np.ndarray:
        """Step 2: (H, W, 3) -> (h, w, 3) through PIL's 8-bit resize with `self.resample`."""
        new_h, new_w = self.output_size(*x.shape[:2])
        pixels, scaled_up = _pil_ready(x)
        out = np.array(PIL.Image.fromarray(pixels).resize((new_w, new_h), resample=self.resample))  # PIL takes (w, h)
        # Floats that were scaled to 0..255 for PIL go back to [0, 1] (float64 product, float32).
        return (out.astype(np.float64) / 255).astype(np.float32) if scaled_up else out

    def center_crop(self, x: np.ndarray) -> np.ndarray:
        """Step 3: (H, W, C) -> (h, w, C), centred. An image smaller than the crop is first placed
        on a zero canvas, with the odd pixel of padding at the top (left)."""
        h, w = self.crop_size["height"], self.crop_size["width"]
        H, W = x.shape[:2]
        if H < h or W < w:
            canvas_h, canvas_w = max(H, h), max(W, w)
            top, left = math.ceil((canvas_h - H) / 2), math.ceil((canvas_w - W) / 2)
            canvas = np.zeros((canvas_h, canvas_w, x.shape[2]), dtype=x.dtype)
            canvas[top:top + H, left:left + W] = x
            x, H, W = canvas, canvas_h, canvas_w
        top, left = (H - h) // 2, (W - w) // 2  # floor: an odd extra row/column is cut at the bottom/right
        return x[top:top + h, left:left + w]

    # ------------------------------------------------------------------------------------------
    # The whole path

    def preprocess_one(self, image) -> np.ndarray:
        """One image -> (3, h, w) float32: steps 1 to 5."""
        x = _to_array(image, self.do_convert_rgb)  # (H, W, 3)
        if self.do_resize:
            x = self.resize(x)
        if self.do_center_crop:
            x = self.center_crop(x)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)  # step 4
        if self.do_normalize:
            # Step 5 in the image's float dtype (float32 after step 4), integers promoted to float32.
            x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
            mean, std = np.array(self.image_mean, dtype=x.dtype), np.array(self.image_std, dtype=x.dtype)
            x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)  # (h, w, 3) -> (3, h, w)

    def preprocess(self, images=None, return_tensors: str | None = None, **settings) -> ImageProcessorOutput:
        """images: one image, a list, or a 4-D batch -> ImageProcessorOutput with `pixel_values`:
        (B, 3, h, w) float32 tensor ("pt"), numpy array ("np"), or a list of (3, h, w) arrays
        (None, transformers' default). Keyword settings (do_resize=False, size=...) apply to this
        call only."""
        if images is None:
            raise InputError("CLIPImageProcessor needs images=... (a PIL image, an array, or a list of them).")
        if return_tensors is not None and return_tensors not in ("pt", "np"):
            raise InputError(f"return_tensors must be 'pt', 'np' or None; got {return_tensors!r}.")
        processor = self
        if settings:
            unknown = sorted(set(settings) - set(SETTINGS))
            if unknown:
                raise InputError(f"Unknown CLIPImageProcessor setting(s) {unknown}; the settings are {list(SETTINGS)}.")
            processor = type(self)(**{**self.to_dict(), **settings})
        items = _split_batch(images)
        if processor.do_rescale and any(isinstance(i, np.ndarray) and np.issubdtype(i.dtype, np.floating)
                                        and i.size and 0 <= i.min() and i.max() <= 1
                                        and not np.allclose(i, np.round(i)) for i in items):
            warnings.warn("These float images look already scaled to [0, 1]; do_rescale=True scales them by "
                          f"{processor.rescale_factor:.6g} again (as transformers does). Pass do_rescale=False "
                          "if that is not what you want.", stacklevel=2)
        pixels = [processor.preprocess_one(i) for i in items]
        if return_tensors is None:
            return ImageProcessorOutput(pixels)
        shapes = sorted({p.shape for p in pixels})
        if len(shapes) > 1:
            raise InputError(f"The images came out in different sizes {shapes}, which cannot be stacked; keep "
                             f"do_center_crop=True, or use return_tensors=None for a list.")
        stacked = np.stack(pixels)  # (B, 3, h, w)
        return ImageProcessorOutput(torch.from_numpy(stacked) if return_tensors == "pt" else stacked)

    __call__ = preprocess
