"""minidiff: a readable reimplementation of the Stable Diffusion family in pure PyTorch.

The public names are listed here and imported lazily (on first use), so `import minidiff` is
cheap and a student can open exactly the file a name comes from.
"""

from __future__ import annotations

from minidiff.lazy import lazy_names

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    # tokenizer and loading
    "CLIPTokenizer": "minidiff.tokenizer",
    "CLIPImageProcessor": "minidiff.image_processor",
    # schedulers
    "DDPMScheduler": "minidiff.schedulers.ddpm",
    "DDIMScheduler": "minidiff.schedulers.ddim",
    "DDIMInverseScheduler": "minidiff.schedulers.ddim",
    "UnCLIPScheduler": "minidiff.schedulers.unclip",
    # models
    "CLIPTextModel": "minidiff.models.clip",
    "CLIPTextModelWithProjection": "minidiff.models.clip",
    "CLIPVisionModelWithProjection": "minidiff.models.clip",
    "AutoencoderKL": "minidiff.models.vae",
    "VQModel": "minidiff.models.vq",
    "UNet2DConditionModel": "minidiff.models.unet",
    "PriorTransformer": "minidiff.models.prior",
    # pipelines
    "StableDiffusionPipeline": "minidiff.pipelines.text_to_image",
    "DiffEditPipeline": "minidiff.pipelines.diffedit",
    "StableDiffusionDiffEditPipeline": "minidiff.pipelines.diffedit",  # diffusers' name, the same class
    "DiffusionPipeline": "minidiff.pipelines.pipeline",
    "KandinskyV22PriorPipeline": "minidiff.pipelines.kandinsky",
    "KandinskyPriorPipeline": "minidiff.pipelines.kandinsky",  # diffusers' 2.1 name, the same class here
    "KandinskyV22Pipeline": "minidiff.pipelines.kandinsky_decoder",
    "KandinskyV22CombinedPipeline": "minidiff.pipelines.kandinsky_decoder",
    "AutoPipelineForText2Image": "minidiff.pipelines.auto",
    # quantization at load time (diffusers.quantizers.PipelineQuantizationConfig)
    "PipelineQuantizationConfig": "minidiff.quantizers",
    # attention backend switch
    "attention_backend": "minidiff.models.attention",
    "set_attention_backend": "minidiff.models.attention",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
