"""`AutoPipelineForText2Image`: the text-to-image pipeline of whatever family a folder holds.

diffusers picks the task's pipeline from model_index.json's class name; minidiff does the same for
the two families it has:

    StableDiffusionPipeline                             -> StableDiffusionPipeline
    KandinskyV22Pipeline (a decoder folder),
    KandinskyV22CombinedPipeline                        -> KandinskyV22CombinedPipeline

A Kandinsky decoder folder becomes the combined pipeline: prompt -> prior -> decoder. Its prior
comes from the `prior_*` components passed in (the training guide hands over a trained prior
this way: `{"prior_" + k: v for k, v in prior_pipeline.components.items()}`) or from the prior
the decoder's README names (kandinsky_decoder.connected_prior).
"""

from __future__ import annotations

import os

from minidiff.errors import InputError
from minidiff.loading import read_json, resolve_folder

TEXT2IMAGE = {
    "StableDiffusionPipeline": ("minidiff.pipelines.text_to_image", "StableDiffusionPipeline"),
    "KandinskyV22Pipeline": ("minidiff.pipelines.kandinsky_decoder", "KandinskyV22CombinedPipeline"),
    "KandinskyV22CombinedPipeline": ("minidiff.pipelines.kandinsky_decoder", "KandinskyV22CombinedPipeline"),
}


def text_to_image_class(class_name: str | None) -> type:
    import importlib

    if class_name not in TEXT2IMAGE:
        raise InputError(f"AutoPipelineForText2Image has no text-to-image pipeline for {class_name!r}; it maps "
                         f"{sorted(TEXT2IMAGE)}.")
    module, attribute = TEXT2IMAGE[class_name]
    return getattr(importlib.import_module(module), attribute)


class AutoPipelineForText2Image:
    """Not instantiated: `AutoPipelineForText2Image.from_pretrained(path, **kwargs)` returns the
    family's text-to-image pipeline, loaded with the same arguments."""

    def __init__(self, *args, **kwargs):
        raise TypeError("AutoPipelineForText2Image is built with AutoPipelineForText2Image.from_pretrained(path).")

    @classmethod
    def pipeline_class(cls, pretrained_model_name_or_path: str | os.PathLike, local_files_only: bool | None = None) -> type:
        root = resolve_folder(pretrained_model_name_or_path, allow_patterns=["*.json", "*.md"],
                              local_files_only=local_files_only)
        return text_to_image_class(read_json(root, "model_index.json").get("_class_name"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        target = cls.pipeline_class(pretrained_model_name_or_path, kwargs.get("local_files_only"))
        return target.from_pretrained(pretrained_model_name_or_path, **kwargs)
