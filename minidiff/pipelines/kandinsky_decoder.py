"""Kandinsky 2.2's decoder, and prior + decoder together: CLIP image embedding -> image.

The second half of unCLIP (Ramesh et al. 2022, sec. 2.1): a latent diffusion model whose only
condition is a CLIP image embedding z_i. The prior (kandinsky.py) makes z_i from a caption; this
decoder paints it. There is no text in the decoder at all.

    image_embeds z_i (B, E)         E = unet.config.encoder_hid_dim (1280 for Kandinsky 2.2)
    negative_image_embeds (B, E)    the "no image" embedding the prior pipeline returns
    x_T ~ N(0, I) (B, 4, h, w)      MoVQ latents, h = H / movq_scale_factor (8 for 2.2)
    for t in scheduler.timesteps:   (DDPM, 100 "leading" steps by default: 991, 981, ..., 1)
        out = unet([x_t, x_t], t, added_cond_kwargs={"image_embeds": [neg, z_i]})   (2B, 8, h, w)
        eps, var = out[:, :4], out[:, 4:]           the UNet also predicts a variance (Nichol &
                                                    Dhariwal 2021); DDPM's fixed_small ignores it
        eps = eps_neg + w (eps_img - eps_neg)       classifier-free guidance on eps only; the
                                                    variance of the conditional half is kept
        x_{t-1} = scheduler.step(eps, t, x_t)
    image = movq.decode(x_0, force_not_quantize=True)   the latent is decoded as it is: the
                                                    sampler's x_0 is never snapped to the codebook

Inside the UNet (models/unet_kandinsky.py) z_i enters twice: projected to 32 context tokens for
the cross-attention (encoder_hid_dim_type "image_proj"), and added to the time embedding
(addition_embed_type "image").

Three diffusers details reproduced for parity:
  - the image size is rounded *up* to a multiple of movq_scale_factor**2 before dividing
    (`downscale_height_and_width`: 512 -> 64 latents, but 500 -> 64 latents too, so a 512 image);
  - output_type "pt" returns MoVQ's output in [-1, 1], not [0, 1] ("np" and "pil" are rescaled);
  - in the combined pipeline `latents` are the *prior's* starting noise, not the decoder's.

The combined pipeline (KandinskyV22CombinedPipeline) holds the prior's components with a
`prior_` prefix (`prior_prior`, `prior_text_encoder`, ...) next to the decoder's (`unet`,
`scheduler`, `movq`), runs the prior pipeline, then this one. The training guide's hand-over,
`{"prior_" + k: v for k, v in prior_pipeline.components.items()}` passed to
`AutoPipelineForText2Image.from_pretrained(decoder_folder, ...)`, builds it (auto.py).

Reference: diffusers' KandinskyV22Pipeline and KandinskyV22CombinedPipeline (argument names and
defaults: 100 steps, guidance 4.0, 512x512, output_type "pil").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minidiff.errors import InputError
from minidiff.loading import read_json, resolve_folder
from minidiff.pipelines.images import numpy_to_pil
from minidiff.pipelines.kandinsky import KandinskyV22PriorPipeline
from minidiff.pipelines.pipeline import DiffusionPipeline
from minidiff.schedulers.base import randn
from minidiff.validation import check_choice, check_guidance, check_positive_int


@dataclass
class ImagePipelineOutput:
    """diffusers' ImagePipelineOutput: `.images` (PIL list, numpy (B, H, W, 3) or a tensor)."""

    images: Any

    def __getitem__(self, i):
        return (self.images,)[i]


# What callback_on_step_end may ask for (diffusers' _callback_tensor_inputs of the decoder).
CALLBACK_TENSORS = ("latents", "image_embeds", "negative_image_embeds")


def latent_size(height: int, width: int, scale_factor: int) -> tuple[int, int]:
    """diffusers' `downscale_height_and_width`: each side rounded up to a multiple of
    scale_factor**2 pixels, then divided by scale_factor. The extra factor keeps the latent
    divisible by scale_factor, which the decoder UNet's three halvings need when the MoVQ and
    the UNet have the same depth (both 8 for Kandinsky 2.2)."""
    def one(side):
        return -(-side // scale_factor**2) * scale_factor  # ceil(side / f^2) * f
    return one(height), one(width)


def _embeds(x, name: str) -> torch.Tensor:
    """A tensor (B, E) or a list of them (concatenated, as diffusers does)."""
    if isinstance(x, (list, tuple)):
        if not x or not all(isinstance(e, torch.Tensor) for e in x):
            raise InputError(f"`{name}` must be a tensor (batch, embedding) or a non-empty list of them.")
        x = torch.cat(list(x), dim=0)
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"`{name}` must be a tensor of shape (batch, embedding), e.g. the prior pipeline's "
                         f"output; got {shape}.")
    return x


class KandinskyV22Pipeline(DiffusionPipeline):
    _diffusers_class_name = "KandinskyV22Pipeline"

    def __init__(self, unet, scheduler, movq):
        self.unet, self.scheduler, self.movq = unet, scheduler, movq
        self._progress_bar_config: dict = {}
        self.recommended_settings: dict = {}

    @property
    def movq_scale_factor(self) -> int:
        """Pixels per latent along a side: 2 ** (MoVQ levels - 1) (8 for Kandinsky 2.2)."""
        return self.movq.downsample_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @staticmethod
    def check_call(height, width, num_inference_steps, guidance_scale, output_type,
                   callback_on_step_end_tensor_inputs) -> None:
        """The decoder call's own arguments (the combined pipeline checks them before its prior runs)."""
        check_positive_int("num_inference_steps", num_inference_steps)
        check_positive_int("height", height, " pixels")
        check_positive_int("width", width, " pixels")
        check_guidance(guidance_scale)
        check_choice("output_type", output_type, ("pil", "np", "pt", "latent"))
        for name in callback_on_step_end_tensor_inputs:
            check_choice("callback_on_step_end_tensor_inputs", name, CALLBACK_TENSORS)

    def _check(self, image_embeds, negative_image_embeds, height, width, num_inference_steps, guidance_scale,
               num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs):
        self.check_call(height, width, num_inference_steps, guidance_scale, output_type,
                        callback_on_step_end_tensor_inputs)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        width_e = self.unet.config.encoder_hid_dim
        for name, e in (("image_embeds", image_embeds), ("negative_image_embeds", negative_image_embeds)):
            if e is not None and e.shape[-1] != width_e:
                raise InputError(f"`{name}` has {e.shape[-1]} features, but this decoder's UNet takes image embeddings "
                                 f"of {width_e} (encoder_hid_dim); is it the prior this decoder was trained with?")
        if guidance_scale > 1.0:
            if negative_image_embeds is None:
                raise InputError("Guidance (guidance_scale > 1) needs `negative_image_embeds`: pass the prior "
                                 "pipeline's negative_image_embeds, or guidance_scale=1.")
            if negative_image_embeds.shape[0] != image_embeds.shape[0]:
                raise InputError(f"Got {negative_image_embeds.shape[0]} negative_image_embeds for "
                                 f"{image_embeds.shape[0]} image_embeds; pass one per image embedding.")

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: torch.Tensor | list[torch.Tensor],
        negative_image_embeds: torch.Tensor | list[torch.Tensor] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        image_embeds = _embeds(image_embeds, "image_embeds")
        if negative_image_embeds is not None:
            negative_image_embeds = _embeds(negative_image_embeds, "negative_image_embeds")
        self._check(image_embeds, negative_image_embeds, height, width, num_inference_steps, guidance_scale,
                    num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs)
        device = self.device
        do_cfg = guidance_scale > 1.0

        # 1. The condition: each embedding repeated num_images_per_prompt times, and with guidance
        #    the negative ones first, [neg; z_i] (2B, E), in the UNet's dtype.
        batch = image_embeds.shape[0] * num_images_per_prompt
        if do_cfg:
            image_embeds = image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            negative_image_embeds = negative_image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            image_embeds = torch.cat([negative_image_embeds, image_embeds]).to(device=device, dtype=self.dtype)

        # 2. Timesteps (the scheduler's config: DDPM, "leading", steps_offset 1 for Kandinsky 2.2).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 3. x_T ~ N(0, I), (B, 4, h, w). Like diffusers, without guidance the embeddings are not
        #    repeated (a batch of one embedding makes one image whatever num_images_per_prompt says).
        h, w = latent_size(height, width, self.movq_scale_factor)
        shape = (batch, self.unet.config.in_channels, h, w)
        if latents is None:
            latents = randn(shape, generator, device, image_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents must have shape {shape}; got {tuple(latents.shape)}.")
        x_t = latents.to(device) * self.scheduler.init_noise_sigma
        C = x_t.shape[1]
        learned = getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")

        # 4. Denoise.
        for i, t in enumerate(self.progress_bar(timesteps, desc="decoder")):
            x_in = torch.cat([x_t, x_t]) if do_cfg else x_t
            out = self.unet(x_in, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": image_embeds},
                            return_dict=False)[0]  # (2B, 2C, h, w): eps and the learned variance
            if do_cfg:
                eps, variance = out.split(C, dim=1)
                eps_neg, eps_img = eps.chunk(2)
                eps = eps_neg + guidance_scale * (eps_img - eps_neg)
                out = torch.cat([eps, variance.chunk(2)[1]], dim=1)  # (B, 2C, h, w)
            if not learned:  # fixed_small and friends take eps alone
                out = out[:, :C]
            x_t = self.scheduler.step(out, t, x_t, generator=generator).prev_sample
            self.check_finite(x_t, "decoder", i, len(timesteps), t)
            if callback_on_step_end is not None:  # diffusers' hook: it may replace what it is given
                current = {"latents": x_t, "image_embeds": image_embeds, "negative_image_embeds": negative_image_embeds}
                replaced = callback_on_step_end(self, i, t, {k: current[k] for k in callback_on_step_end_tensor_inputs}) or {}
                x_t = replaced.get("latents", x_t)
                image_embeds = replaced.get("image_embeds", image_embeds)
                negative_image_embeds = replaced.get("negative_image_embeds", negative_image_embeds)

        # 5. Decode without snapping to the codebook (see the module docstring).
        if output_type == "latent":
            images = x_t
        else:
            images = self.movq.decode(x_t, force_not_quantize=True).sample  # (B, 3, H, W) in ~[-1, 1]
            if output_type in ("np", "pil"):
                images = (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = numpy_to_pil(images)
        return ImagePipelineOutput(images) if return_dict else (images,)


class KandinskyV22CombinedPipeline(DiffusionPipeline):
    """prompt -> prior pipeline -> (image_embeds, negative_image_embeds) -> decoder pipeline -> image."""

    _diffusers_class_name = "KandinskyV22CombinedPipeline"

    def __init__(self, unet, scheduler, movq, prior_prior, prior_image_encoder, prior_text_encoder,
                 prior_tokenizer, prior_scheduler, prior_image_processor):
        self.unet, self.scheduler, self.movq = unet, scheduler, movq
        self.prior_prior, self.prior_image_encoder = prior_prior, prior_image_encoder
        self.prior_text_encoder, self.prior_tokenizer = prior_text_encoder, prior_tokenizer
        self.prior_scheduler, self.prior_image_processor = prior_scheduler, prior_image_processor
        self._progress_bar_config: dict = {}
        self.recommended_settings: dict = {}
        # The two stages are ordinary pipelines on the same component objects (no copies).
        self.prior_pipe = KandinskyV22PriorPipeline(prior_prior, prior_image_encoder, prior_text_encoder,
                                                    prior_tokenizer, prior_scheduler, prior_image_processor)
        self.decoder_pipe = KandinskyV22Pipeline(unet, scheduler, movq)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # While CPU offload is installed on the combined pipeline (memory/offload sets
    # `execution_device`), the two stages must run their loops on the accelerator too.
    _execution_device = None

    @property
    def execution_device(self):
        return self._execution_device

    @execution_device.setter
    def execution_device(self, value):
        self._execution_device = value
        for stage in ("prior_pipe", "decoder_pipe"):
            if hasattr(self, stage):
                getattr(self, stage).execution_device = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, variant: str | None = None,
                        local_files_only: bool | None = None, **components):
        """A combined folder (model_index.json names this class, prior_* subfolders), or, as in
        diffusers, a *decoder* folder: its unet / scheduler / movq, plus the prior's components
        from `components` (`prior_prior=...`, the training guide's hand-over) or, for those not
        given, from the prior the decoder's README.md names (`prior:` in its front matter, a hub
        id or a folder relative to the decoder's)."""
        root = resolve_folder(pretrained_model_name_or_path, allow_patterns=["*.json", "*.md"],
                              local_files_only=local_files_only)
        if read_json(root, "model_index.json").get("_class_name") == cls._diffusers_class_name:
            return super().from_pretrained(pretrained_model_name_or_path, torch_dtype=torch_dtype, device=device,
                                           variant=variant, local_files_only=local_files_only, **components)
        prior_names = [n for n in cls.component_names() if n.startswith("prior_")]
        unknown = sorted(set(components) - set(cls.component_names()))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown component(s) {unknown}; its components "
                            f"are {cls.component_names()}.")
        decoder = KandinskyV22Pipeline.from_pretrained(
            pretrained_model_name_or_path, torch_dtype=torch_dtype, variant=variant, local_files_only=local_files_only,
            **{k: v for k, v in components.items() if not k.startswith("prior_")})
        prior_parts = {n: components[n] for n in prior_names if n in components}
        if len(prior_parts) < len(prior_names):
            source = connected_prior(root)
            if source is None:
                missing = sorted(set(prior_names) - set(prior_parts))
                raise InputError(f"{str(root)!r} is a decoder folder and names no prior (README.md front matter "
                                 f"`prior:`); pass the prior's components, e.g. {missing[0]}=..., or load a prior "
                                 "pipeline and pass {'prior_' + k: v for k, v in prior.components.items()}.")
            prior = KandinskyV22PriorPipeline.from_pretrained(
                source, torch_dtype=torch_dtype, local_files_only=local_files_only,
                **{n.removeprefix("prior_"): v for n, v in prior_parts.items()})
            prior_parts = {"prior_" + k: v for k, v in prior.components.items()}
        pipe = cls(**decoder.components, **prior_parts)
        pipe.recommended_settings = decoder.recommended_settings
        return pipe.to(device) if device is not None else pipe

    def set_progress_bar_config(self, **kwargs) -> None:
        super().set_progress_bar_config(**kwargs)
        self.prior_pipe.set_progress_bar_config(**kwargs)
        self.decoder_pipe.set_progress_bar_config(**kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end=None,
        prior_callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        # The decoder's arguments are checked before the prior runs: a bad one must not cost a
        # prior run first (the prior pipeline checks its own).
        KandinskyV22Pipeline.check_call(height, width, num_inference_steps, guidance_scale, output_type,
                                        callback_on_step_end_tensor_inputs)
        # 1. The prior: (B*n, E) image embeddings and their negatives. `latents` are its noise.
        image_embeds, negative_image_embeds = self.prior_pipe(
            prompt=prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=prior_num_inference_steps, generator=generator, latents=latents,
            guidance_scale=prior_guidance_scale, output_type="pt", return_dict=False,
            callback_on_step_end=prior_callback_on_step_end,
            callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs)
        # 2. The decoder, one image per embedding (the prior already made n per prompt).
        return self.decoder_pipe(
            image_embeds=image_embeds, negative_image_embeds=negative_image_embeds, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)


def connected_prior(root: Path) -> str | None:
    """The prior a decoder folder names: `prior:` in its README.md's YAML front matter (diffusers'
    "connected pipelines"; kandinsky-2-2-decoder's card lists kandinsky-community/kandinsky-2-2-prior).
    A relative folder is looked up from the decoder folder and then from each folder above it, so
    weights/shapes-decoder's `weights/shapes-prior` is found from any working directory (diffusers
    reads it relative to the working directory: the repository root); anything else (a hub id) is
    returned as it is."""
    card = Path(root) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    import yaml  # a dependency of huggingface_hub

    front = yaml.safe_load(text.split("---", 2)[1]) or {}
    value = front.get("prior")
    value = value[0] if isinstance(value, list) and value else value
    if not isinstance(value, str) or not value:
        return None
    here = Path(root).resolve()
    for base in (here, *here.parents):
        if (base / value).is_dir():
            return os.fspath((base / value).resolve())
    return value
