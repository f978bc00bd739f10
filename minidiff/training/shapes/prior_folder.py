"""The shapes prior's starting folder: the shapes CLIP laid out as kandinsky-2-2-prior is.

    text_encoder/      CLIPTextModelWithProjection: the shapes text tower plus the text projection
                       its contrastive training learned (train_clip.py saves that projection
                       on its own, because the SD pipeline's text_encoder/ is a plain CLIPTextModel)
    image_encoder/     CLIPVisionModelWithProjection, the shapes vision tower
    tokenizer/         the shapes tokenizer (CLIP's vocabulary, SD 1.x's special tokens)
    image_processor/   CLIPImageProcessor at the vision tower's 128 px
    scheduler/         UnCLIPScheduler with kandinsky-2-2-prior's settings (configs.PRIOR_SCHEDULER)

`minidiff train-prior --pretrained_prior_model_name_or_path FOLDER --prior_config ...` then adds
prior/ and model_index.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minidiff.errors import InputError
from minidiff.loading import write_json
from minidiff.models.clip import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)
from minidiff.schedulers.unclip import UnCLIPScheduler
from minidiff.training.shapes.configs import PRIOR_SCHEDULER
from minidiff.training.shapes.export import image_processor_config
from minidiff.training.shapes.train_clip import load_tokenizer


def save_prior_encoders(out_dir, components_dir, dtype: torch.dtype = torch.float16) -> Path:
    """Write the folder above from train_clip.py's outputs in `components_dir` (text_encoder/,
    image_encoder/, clip_text_projection.pt), weights cast to `dtype`."""
    out_dir, components_dir = Path(out_dir), Path(components_dir)
    projection = components_dir / "clip_text_projection.pt"
    if not projection.is_file():
        raise InputError(f"{components_dir} has no clip_text_projection.pt (train_clip.py writes it beside text_encoder/).")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{str(out_dir)!r} is not empty; write the prior's starting folder into a new one.")
    text = CLIPTextModel.from_pretrained(components_dir / "text_encoder", torch_dtype=torch.float32)
    with_projection = CLIPTextModelWithProjection(text.config)
    with_projection.text_model.load_state_dict(text.text_model.state_dict())
    with_projection.text_projection.load_state_dict(torch.load(projection, map_location="cpu", weights_only=True))
    with_projection.to(dtype).save_pretrained(out_dir / "text_encoder")
    vision = CLIPVisionModelWithProjection.from_pretrained(components_dir / "image_encoder", torch_dtype=torch.float32)
    vision.to(dtype).save_pretrained(out_dir / "image_encoder")
    load_tokenizer().save_pretrained(out_dir / "tokenizer")
    (out_dir / "image_processor").mkdir()
    write_json(image_processor_config(vision.config.image_size), out_dir / "image_processor" / "preprocessor_config.json")
    UnCLIPScheduler(**PRIOR_SCHEDULER).save_pretrained(out_dir / "scheduler")
    return out_dir
