"""Export the trained shapes-world components as one Stable Diffusion pipeline folder.

The folder (the diffusers layout, which minidiff and diffusers both load):

    model_index.json   StableDiffusionPipeline: unet, vae, text_encoder, tokenizer, scheduler, image_encoder
    unet/ vae/ text_encoder/ image_encoder/   the trained components, cast to fp16 (half the size)
    tokenizer/         CLIP's vocabulary and merges with SD 1.x's special tokens (train_clip.load_tokenizer)
    scheduler/         DDIM with SD 1.x's settings (configs.SD_DDIM)
    image_encoder/preprocessor_config.json   CLIPImageProcessor at 128 px with CLIP's mean and std

Everything but the image processor is written by minidiff's own `save_pretrained`: the
pipeline's (model_index.json and one folder per component), each model's, DDIMScheduler's and
CLIPTokenizer's. The image processor is a transformers object minidiff has no class for (the
pipelines never read it), so its config is written here.

`save_pipeline` refuses a folder that already holds files unless `overwrite=True`; it then replaces
the pipeline's own entries only, so a judge/, training/ curves or a README.md beside them stay.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from minidiff.errors import InputError
from minidiff.loading import write_json
from minidiff.models.clip import CLIPTextModel, CLIPVisionModelWithProjection
from minidiff.models.unet import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.pipelines.text_to_image import StableDiffusionPipeline
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.training.shapes.configs import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_CKPT_DIR,
    SD_DDIM,
)
from minidiff.training.shapes.train_clip import load_tokenizer


def image_processor_config(side: int) -> dict:
    """transformers' CLIPImageProcessor for a vision tower of `side` x `side` pixels: resize the
    short side to `side` (bicubic: resample=3), centre-crop, scale to [0, 1], normalise with CLIP's
    mean and std."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": side},
        "do_center_crop": True, "crop_size": {"height": side, "width": side}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_convert_rgb": True, "resample": 3,
    }


def shapes_pipeline(components_dir=DEFAULT_CKPT_DIR, dtype: torch.dtype = torch.float16) -> StableDiffusionPipeline:
    """The pipeline of the components the loops saved in `components_dir` (unet/, vae/,
    text_encoder/, image_encoder/), weights cast to `dtype`, with SD's DDIM sampler."""
    folder = Path(components_dir)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae").to(dtype),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").to(dtype),
        tokenizer=load_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet").to(dtype),
        scheduler=DDIMScheduler(**SD_DDIM),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").to(dtype),
    )


def save_pipeline(out_dir, ckpt_dir=DEFAULT_CKPT_DIR, dtype: torch.dtype = torch.float16,
                  overwrite: bool = False) -> Path:
    """Write the pipeline folder `out_dir` from the trained components in `ckpt_dir`; return it.

    The pipeline is saved next to `out_dir` first and its entries are moved in when complete. A
    non-empty `out_dir` needs `overwrite=True`, which replaces model_index.json and the component
    folders and leaves every other file there (the judge, the training curves) alone."""
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite):
        raise InputError(f"{str(out_dir)!r} already exists and is not empty; export into a new folder, or pass "
                         f"overwrite=True (--overwrite) to replace its pipeline files and keep the rest.")
    pipe = shapes_pipeline(ckpt_dir, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staged = Path(tmp) / "pipeline"
        pipe.save_pretrained(staged)
        write_json(image_processor_config(pipe.image_encoder.config.image_size), staged / "image_encoder" / "preprocessor_config.json")
        out_dir.mkdir(exist_ok=True)
        for entry in sorted(staged.iterdir()):
            target = out_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    return out_dir


def folder_size_mb(folder, exclude=("judge",)) -> float:
    """Size of the files in `folder` in MiB, leaving out the top-level entries named in `exclude`."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and p.relative_to(folder).parts[0] not in exclude) / 2**20
