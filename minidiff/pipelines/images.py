"""Images in, images out: the conversions every pipeline needs.

Pipelines accept what diffusers accepts and return what it returns:
    PIL.Image or list of them     (H, W) RGB, 0..255
    numpy array                   (H, W, 3) or (B, H, W, 3), floats in [0, 1]
    torch tensor                  (3, H, W) or (B, 3, H, W); values in [-1, 1], or in [0, 1] (then
                                  rescaled, as diffusers' VaeImageProcessor does when min >= 0)
Inside, an image is a float tensor (B, 3, H, W) in [-1, 1]: the range the VAE was trained on.

Masks (DiffEdit) live at latent size (h, w) = (H, W) / vae_scale_factor, 1 = edit, 0 = keep:
    preprocess_mask   PIL, numpy or tensor; (h, w), (B, h, w) or (B, 1, h, w) -> (B, 1, h, w) of 0/1
    mask_output       (B, h, w) bool -> int64 numpy ("np", as diffusers), float tensor ("pt") or
                      L-mode PIL images of 0/255 ("pil")
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from minidiff.errors import InputError, NonFiniteError


def _to_list(image):
    return list(image) if isinstance(image, (list, tuple)) else [image]


def preprocess_image(image, multiple: int = 8, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Any supported image input -> (B, 3, H, W) float32 in [-1, 1].

    PIL images are resized to (width, height) when those are given. Sides must be divisible by
    `multiple` (8 for Stable Diffusion: the VAE halves the size three times); we refuse rather
    than silently crop or resize, so the output has the size the user expects.
    """
    if image is None:
        raise InputError("An image is required, but `image` is None.")
    items = _to_list(image)
    if all(isinstance(i, PIL.Image.Image) for i in items):
        arrays = []
        for im in items:
            im = im.convert("RGB")
            if height is not None and width is not None and im.size != (width, height):
                im = im.resize((width, height), PIL.Image.LANCZOS)
            arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        x = 2.0 * x - 1.0
    elif all(isinstance(i, np.ndarray) for i in items):
        arr = np.concatenate([i[None] if i.ndim == 3 else i for i in items]).astype(np.float32)
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise InputError(f"A numpy image must be (H, W, 3) or (B, H, W, 3) in [0, 1]; got shape {arr.shape}.")
        x = 2.0 * torch.from_numpy(arr).permute(0, 3, 1, 2) - 1.0
    elif all(isinstance(i, torch.Tensor) for i in items):
        x = torch.cat([i[None] if i.ndim == 3 else i for i in items]).float()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InputError(f"A tensor image must be (3, H, W) or (B, 3, H, W); got shape {tuple(x.shape)}.")
        if x.min() >= 0:  # [0, 1] -> [-1, 1]; a tensor with negative values is taken as [-1, 1]
            x = 2.0 * x - 1.0
    else:
        kinds = sorted({type(i).__name__ for i in items})
        raise InputError(f"`image` must be PIL images, numpy arrays or torch tensors (one kind); got {kinds}.")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise InputError(
            f"Image sides must be divisible by {multiple} (the VAE downsamples by that factor); "
            f"got {h}x{w}. Resize or crop it, e.g. to {h // multiple * multiple}x{w // multiple * multiple}."
        )
    return x


def check_image_size(height, width, multiple: int, vae_scale_factor: int, what: str = "The image") -> None:
    """The one size rule of an SD-style model: both sides positive multiples of `multiple` =
    vae_scale_factor x 2**(the UNet's halvings), so that every upsampled map meets its skip."""
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % multiple == 0 for v in (height, width))
    if ok:
        return
    halvings = (multiple // vae_scale_factor).bit_length() - 1

    def near(v):
        return max(multiple, round(v / multiple) * multiple) if isinstance(v, (int, float)) and v > 0 else multiple

    raise InputError(
        f"{what} is {width}x{height} (width x height), but this model needs positive multiples of {multiple} pixels "
        f"on each side (the VAE divides by {vae_scale_factor}, then the UNet halves {halvings} more times); "
        f"e.g. {near(width)}x{near(height)}.")


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, C) floats in [0, 1] -> list of PIL images (RGB, or L for one channel)."""
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [PIL.Image.fromarray(i[..., 0], mode="L") for i in images]
    return [PIL.Image.fromarray(i) for i in images]


def postprocess(image: torch.Tensor, output_type: str = "pil"):
    """(B, 3, H, W) in [0, 1] -> "pt" (the tensor), "np" ((B, H, W, 3) float32) or "pil" (list)."""
    if output_type == "pt":
        return image
    array = image.detach().cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    if output_type == "pil":
        return numpy_to_pil(array)
    raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}.")


def preprocess_mask(mask, batch_size: int, latent_size: tuple[int, int]) -> torch.Tensor:
    """A mask (PIL, numpy or tensor; (h, w), (B, h, w) or (B, 1, h, w); values in [0, 1]) ->
    (batch_size, 1, h, w) float of 0/1 (binarised at 0.5). 1 = repaint, 0 = keep."""
    if mask is None:
        raise InputError("`mask_image` is required: compute one with `pipe.generate_mask(...)`.")
    items = _to_list(mask)
    if all(isinstance(m, PIL.Image.Image) for m in items):
        m = torch.from_numpy(np.stack([np.asarray(i.convert("L"), dtype=np.float32) / 255.0 for i in items]))
    elif all(isinstance(m, (np.ndarray, torch.Tensor)) for m in items):
        parts = [torch.as_tensor(np.asarray(i)) if isinstance(i, np.ndarray) else i.detach().cpu() for i in items]
        m = torch.stack(parts) if parts[0].ndim == 2 else torch.cat(parts)  # list of (h, w) or of batches
        m = m.float()
    else:
        raise InputError(f"`mask_image` must be PIL images, numpy arrays or tensors; got {type(items[0]).__name__}.")
    if m.ndim == 2:
        m = m[None]  # (h, w) -> (1, h, w)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]  # (B, 1, h, w) -> (B, h, w)
    if m.ndim != 3:
        raise InputError(f"A mask must be (h, w), (B, h, w) or (B, 1, h, w) (one channel); got shape {tuple(m.shape)}.")
    if tuple(m.shape[-2:]) != tuple(latent_size):
        h, w = latent_size
        raise InputError(
            f"The mask is {m.shape[-2]}x{m.shape[-1]} but the latents are {h}x{w}: DiffEdit masks live at latent "
            f"size (the image size divided by vae_scale_factor), as generate_mask returns them."
        )
    if not torch.isfinite(m).all():
        raise NonFiniteError("The mask holds NaN or inf values; a mask must be 0 (keep) or 1 (edit) everywhere.")
    if m.min() < 0 or m.max() > 1:
        raise InputError(f"Mask values must be in [0, 1] (1 = edit, 0 = keep); got [{m.min():.3g}, {m.max():.3g}].")
    if m.shape[0] == 1:
        m = m.expand(batch_size, -1, -1)
    elif m.shape[0] != batch_size:
        raise InputError(f"Got {m.shape[0]} masks for {batch_size} images; pass one mask per image, or one for all.")
    return (m >= 0.5).float()[:, None]  # (B, 1, h, w), a new tensor: the caller's mask is untouched


def mask_output(mask: torch.Tensor, output_type: str):
    """(B, h, w) bool -> "np": int64 array of 0/1 (as diffusers); "pt": float tensor;
    "pil": list of L-mode images with 0/255, ready for other inpainting tools."""
    if output_type == "np":
        return mask.long().cpu().numpy()
    if output_type == "pt":
        return mask.float()
    if output_type == "pil":
        return [PIL.Image.fromarray(m) for m in mask.cpu().numpy().astype(np.uint8) * 255]  # 2-D uint8 -> mode "L"
    raise InputError(f"output_type for a mask must be 'np', 'pil' or 'pt'; got {output_type!r}.")


def mask_overlay(image: PIL.Image.Image, mask, color=(255, 40, 40), alpha: float = 0.5) -> PIL.Image.Image:
    """The image with `mask` (any size, values in [0, 1]) painted over it in `color`."""
    mask_img = mask if isinstance(mask, PIL.Image.Image) else numpy_to_pil(np.asarray(mask, dtype=np.float32)[None, ..., None])[0]
    mask_img = mask_img.convert("L").resize(image.size, PIL.Image.NEAREST)
    weight = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0 * alpha  # (H, W, 1)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base * (1 - weight) + np.asarray(color, dtype=np.float32) * weight
    return PIL.Image.fromarray(out.round().astype("uint8"))


def side_by_side(images: list[PIL.Image.Image], gap: int = 4) -> PIL.Image.Image:
    """Images placed left to right on a white strip (all resized to the first one's height)."""
    h = images[0].height
    images = [im if im.height == h else im.resize((round(im.width * h / im.height), h)) for im in images]
    panel = PIL.Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), h), "white")
    x = 0
    for im in images:
        panel.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return panel
