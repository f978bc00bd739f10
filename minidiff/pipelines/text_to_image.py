"""Text-to-image with Stable Diffusion, the sampling loop written out.

    prompt --tokenizer--> ids (B, 77) --CLIP text encoder--> c (B, 77, D)
    x_T ~ N(0, I)  (B, 4, H/8, W/8)
    for t in scheduler.timesteps:                           (T ... 0, e.g. 50 DDIM steps)
        eps_uncond, eps_text = unet([x_t, x_t], t, [c_neg, c])
        eps = eps_uncond + w * (eps_text - eps_uncond)      classifier-free guidance (Ho & Salimans 2022, eq. 6)
        x_{t-1} = scheduler.step(eps, t, x_t)               DDIM eq. 12 (minidiff/schedulers/ddim.py)
    image = vae.decode(x_0 / 0.18215)                       (B, 3, H, W) in [-1, 1]

`StableDiffusionPipeline` is also the base of DiffEdit: it owns prompt encoding, latent decoding
and image conversion; loading, saving, devices and memory switches are `DiffusionPipeline`'s
(pipeline.py).

Reference: diffusers' StableDiffusionPipeline (same argument names and defaults).
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from minidiff.errors import InputError
from minidiff.pipelines.images import check_image_size, postprocess
from minidiff.pipelines.pipeline import DiffusionPipeline
from minidiff.schedulers.base import randn
from minidiff.validation import check_guidance, check_positive_int


@dataclass
class PipelineOutput:
    """diffusers' StableDiffusionPipelineOutput: `.images`, and `nsfw_content_detected`, always None
    (minidiff has no safety checker, as diffusers pipelines loaded with safety_checker=None)."""

    images: Any  # list of PIL images, a numpy array (B, H, W, 3), or a tensor
    nsfw_content_detected: list[bool] | None = None

    def __getitem__(self, i):
        return (self.images, self.nsfw_content_detected)[i]


def _as_list(prompt: str | list[str] | None) -> list[str] | None:
    return [prompt] if isinstance(prompt, str) else prompt


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside minidiff and torch (whose no_grad wrappers sit
    between a user's call and the pipeline), so a warning names the user's line."""
    skip = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


class StableDiffusionPipeline(DiffusionPipeline):
    _diffusers_class_name = "StableDiffusionPipeline"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False):
        # diffusers' signature. minidiff has no safety checker (nor its feature extractor), so those
        # must be None; image_encoder is carried along (diffusers uses it for IP-Adapters) unused.
        if safety_checker is not None or feature_extractor is not None or requires_safety_checker:
            raise InputError("minidiff has no safety checker: pass safety_checker=None, feature_extractor=None "
                             "(and requires_safety_checker=False).")
        self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler = vae, text_encoder, tokenizer, unet, scheduler
        self.safety_checker = self.feature_extractor = None
        self.image_encoder = image_encoder
        self._progress_bar_config: dict = {}
        # The folder's recommended_settings.json (from_pretrained sets it; settings.py). The
        # methods below do not read it: their defaults stay diffusers'.
        self.recommended_settings: dict = {}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # What the loop needs to know about the UNet. The "Tracing" section of diffusers' memory guide
    # swaps in a wrapper of a torch.jit-traced UNet that has no config and no parameters, only
    # `in_channels` and `device`; these three read such a wrapper too.

    @property
    def _unet_in_channels(self) -> int:
        config = getattr(self.unet, "config", None)
        return config.in_channels if config is not None else self.unet.in_channels

    @property
    def _default_size(self) -> int:
        """Image side the UNet was built for: sample_size latents (or the VAE's sample_size)."""
        config = getattr(self.unet, "config", None)
        return config.sample_size * self.vae_scale_factor if config is not None else self.vae.config.sample_size

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE divides them by vae_scale_factor (8), and
        the UNet halves the latent once per downsampler, then doubles it back onto its skips."""
        config = getattr(self.unet, "config", None)
        halvings = len(config.block_out_channels) - 1 if config is not None else 0
        return self.vae_scale_factor * 2**halvings

    def check_image_size(self, height, width, what: str = "The image") -> None:
        check_image_size(height, width, self.size_multiple, self.vae_scale_factor, what)

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype (the text encoder's, for a wrapped UNet without parameters)."""
        weight = next(self.unet.parameters(), None)
        return weight.dtype if weight is not None else next(self.text_encoder.parameters()).dtype

    # ------------------------------------------------------------------------------------------
    # Shared steps

    def _text_states(self, prompts: list[str], device, clip_skip: int | None = None) -> torch.Tensor:
        """list of B prompts -> CLIP hidden states (B, 77, D)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        limit = self.tokenizer.model_max_length
        counts = [len(x) for x in self.tokenizer(prompts, padding=False, return_tensors=None).input_ids]
        for prompt, n in zip(prompts, counts):
            if n > limit:
                short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
                warnings.warn(f"The prompt {short!r} has {n} tokens; CLIP reads {limit}, so the last {n - limit} "
                              "were dropped.", stacklevel=_caller_stacklevel())
        ids = ids.to(device)
        if clip_skip is None:
            return self.text_encoder(ids)[0]
        # clip_skip=k: the hidden state k layers before the last, through the final layer norm.
        states = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return self.text_encoder.text_model.final_layer_norm(states)

    @torch.no_grad()
    def encode_prompt(self, prompt, device, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                      negative_prompt=None, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None, clip_skip: int | None = None):
        """Prompts -> (prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, 77, D);
        negative_prompt_embeds is None without guidance."""
        prompts = _as_list(prompt)
        if prompt_embeds is None:
            if prompts is None:
                raise InputError("Pass either `prompt` or `prompt_embeds`.")
            prompt_embeds = self._text_states(prompts, device, clip_skip)
        batch = prompt_embeds.shape[0]
        # The UNet's dtype, where diffusers takes the text encoder's: transformers 5 loads a text
        # encoder in its file's dtype by default (fp16 for weights/shapes) while the UNet loads in
        # float32, and diffusers' loop then fails on the mixed dtypes. The cast is exact upwards.
        dtype = self.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = [""] * batch if negative_prompt is None else _as_list(negative_prompt)
            if len(negatives) == 1 and batch > 1:
                negatives = negatives * batch
            if len(negatives) != batch:
                raise InputError(f"Got {len(negatives)} negative prompts for {batch} prompts; pass one per prompt, or one for all.")
            # As in diffusers, the negative branch always uses the last layer (clip_skip is not applied).
            negative_prompt_embeds = self._text_states(negatives, device)
        if do_classifier_free_guidance:
            if negative_prompt_embeds.shape != prompt_embeds[::num_images_per_prompt].shape:
                raise InputError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of "
                                 f"prompt_embeds {tuple(prompt_embeds[::num_images_per_prompt].shape)}.")
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> image (B, 3, 8h, 8w) in [0, 1], float32.
        The diffusion model works on latents scaled by `scaling_factor` (0.18215: 1 / the SD VAE
        latent std), so we undo that first."""
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _step_kwargs(self, eta: float, generator) -> dict:
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------------------------------
    # The loop

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        clip_skip: int | None = None,
    ):
        f = self.vae_scale_factor
        height = self._default_size if height is None else height
        width = self._default_size if width is None else width
        self.check_image_size(height, width, "width x height")
        check_positive_int("num_inference_steps", num_inference_steps)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_positive_int("callback_steps", callback_steps)
        check_guidance(guidance_scale)
        if prompt is not None and prompt_embeds is not None:
            raise InputError("Pass `prompt` or `prompt_embeds`, not both.")
        device = self.device
        do_cfg = guidance_scale > 1.0

        # 1. Text conditioning: c (B*n, 77, D), and c_neg for the unconditional branch.
        c, c_neg = self.encode_prompt(prompt, device, num_images_per_prompt, do_cfg, negative_prompt,
                                      prompt_embeds, negative_prompt_embeds, clip_skip)
        context = torch.cat([c_neg, c]) if do_cfg else c  # (2B, 77, D): unconditional first

        # 2. Timesteps, e.g. 50 DDIM steps 981, 961, ..., 1 for SD's "leading" spacing.
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. x_T ~ N(0, I) in latent space (B*n, 4, H/8, W/8).
        shape = (c.shape[0], self._unet_in_channels, height // f, width // f)
        if latents is None:
            latents = randn(shape, generator, device, c.dtype)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents must have shape {shape}; got {tuple(latents.shape)}.")
        x_t = latents.to(device) * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(eta, generator)

        # 4. Denoise: one UNet pass for both guidance branches, then one scheduler step.
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps, desc="text-to-image")):
            x_in = torch.cat([x_t, x_t]) if do_cfg else x_t
            x_in = self.scheduler.scale_model_input(x_in, t)
            eps = self.unet(x_in, t, encoder_hidden_states=context).sample
            if do_cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            x_t = self.scheduler.step(eps, t, x_t, **step_kwargs).prev_sample
            self.check_finite(x_t, "text-to-image", i, len(self.scheduler.timesteps), t)
            if callback is not None and i % callback_steps == 0:
                callback(i, t, x_t, eps)

        # 5. Decode.
        if output_type == "latent":
            images = x_t
        else:
            images = postprocess(self.decode_latents(x_t), output_type)
        return PipelineOutput(images) if return_dict else (images, None)
