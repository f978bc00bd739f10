"""Kandinsky 2.2's prior: text -> CLIP image embedding, the sampling loop written out.

unCLIP (Ramesh et al. 2022, sec. 2) splits text-to-image in two: a *prior* P(z_i | y) that turns
a caption y into a CLIP image embedding z_i, and a *decoder* P(x | z_i) that paints an image with
that embedding. This file is the prior's pipeline:

    prompt --tokenizer--> ids, mask (B, 77) --CLIP text encoder (with projection)-->
        text_embeds (B, P)                  the caption's point in CLIP's joint space
        last_hidden_state (B, 77, D)        per-token states, read through the mask
    z_T ~ N(0, I)  (B, P)                   P = prior.config.embedding_dim (1280 for Kandinsky 2.2)
    for t in scheduler.timesteps:           (999 ... 0, 25 UnCLIP steps by default)
        z0_uncond, z0_text = prior([z_t, z_t], t, [text_embeds_neg, text_embeds], [states_neg, states], [mask_neg, mask])
        z0 = z0_uncond + w * (z0_text - z0_uncond)       classifier-free guidance (Ho & Salimans 2022, eq. 6)
        z_{t-1} = scheduler.step(z0, t, z_t, prev_timestep)   the prior predicts z_0 itself ("sample")
    image_embeds = prior.post_process_latents(z_0)   = z_0 * clip_std + clip_mean (back to CLIP's scale)

`negative_image_embeds`, what the decoder's unconditional branch is given, is **not** a prior
sample: it is the CLIP image encoder applied to an all-zero image (`get_zero_embed`), as diffusers'
KandinskyV22PriorPipeline does.

With a `negative_prompt` diffusers does something subtler. It appends the negative prompts to the
batch (`[prompt, negative]`) and uses the negative prompt as the unconditional text of *both*
halves (`[negative, negative]`): the prompt is guided away from the negative prompt, as intended,
and the negative prompt's own sample is guided against itself, which is no guidance at all
(z0_uncond + w (z0 - z0_uncond) with z0 = z0_uncond). That unguided sample becomes
`negative_image_embeds`. `negative_mode="diffusers"` (the default) reproduces this exactly, for
parity; `negative_mode="guided"` guides the negative prompt's sample against the empty prompt, as
an unguided prompt would be, so `negative_image_embeds` is a proper sample of the negative prompt.

Reference: diffusers' KandinskyV22PriorPipeline (same argument names and defaults: 25 steps,
guidance 4.0, output_type "pt").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from minidiff.errors import InputError
from minidiff.pipelines.pipeline import DiffusionPipeline
from minidiff.schedulers.base import randn
from minidiff.validation import check_choice, check_guidance, check_positive_int


@dataclass
class KandinskyPriorPipelineOutput:
    """diffusers' KandinskyPriorPipelineOutput: `.image_embeds` (B, P) and `.negative_image_embeds`
    (B, P), tensors (output_type "pt") or numpy arrays ("np")."""

    image_embeds: Any
    negative_image_embeds: Any

    def to_tuple(self) -> tuple:
        return self.image_embeds, self.negative_image_embeds

    def __getitem__(self, i):
        return self.to_tuple()[i]


def _as_list(prompt, name: str) -> list[str] | None:
    if prompt is None or isinstance(prompt, list):
        if prompt is not None and not all(isinstance(p, str) for p in prompt):
            raise InputError(f"`{name}` must be a string or a list of strings.")
        return prompt
    if isinstance(prompt, str):
        return [prompt]
    raise InputError(f"`{name}` must be a string or a list of strings; got {type(prompt).__name__}.")


@torch.no_grad()
def zero_image_embed(image_encoder, device=None) -> torch.Tensor:
    """(1, P): the image encoder's embedding of an all-zero image (zero after CLIP's normalisation),
    in the encoder's dtype: the prior pipeline's `negative_image_embeds`, and what the decoder
    trainer's image-embedding dropout trains on."""
    weight = next(image_encoder.parameters())
    side = image_encoder.config.image_size
    zero = torch.zeros(1, 3, side, side, device=weight.device if device is None else device, dtype=weight.dtype)
    return image_encoder(zero).image_embeds


# What callback_on_step_end may ask for (diffusers' _callback_tensor_inputs).
CALLBACK_TENSORS = ("latents", "prompt_embeds", "text_encoder_hidden_states", "text_mask")


class KandinskyV22PriorPipeline(DiffusionPipeline):
    _diffusers_class_name = "KandinskyV22PriorPipeline"

    def __init__(self, prior, image_encoder, text_encoder, tokenizer, scheduler, image_processor):
        self.prior, self.image_encoder, self.text_encoder = prior, image_encoder, text_encoder
        self.tokenizer, self.scheduler, self.image_processor = tokenizer, scheduler, image_processor
        self._progress_bar_config: dict = {}
        self.recommended_settings: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.prior.parameters()).dtype

    # ------------------------------------------------------------------------------------------
    # Shared steps

    @torch.no_grad()
    def get_zero_embed(self, batch_size: int = 1, device=None) -> torch.Tensor:
        """The image encoder's embedding of an all-zero image (B, P): the decoder's "no image"
        conditioning. Zero *after* CLIP's normalisation, i.e. a grey image close to CLIP's mean
        colour, not a black one."""
        device = self.device if device is None else device
        return zero_image_embed(self.image_encoder, device).to(self.dtype).repeat(batch_size, 1)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B prompts -> text_embeds (B, P), last_hidden_state (B, 77, D), mask (B, 77) bool."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        out = self.text_encoder(tokens.input_ids.to(device))
        # In the prior's dtype: transformers 5 loads a CLIP in its file's dtype (fp16 for the shapes
        # prior) while the prior loads in float32. The cast is exact upwards.
        dtype = self.dtype
        return out.text_embeds.to(dtype), out.last_hidden_state.to(dtype), tokens.attention_mask.bool().to(device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                      negative_prompts: list[str] | None = None):
        """The prior's text inputs, each repeated num_images_per_prompt times per prompt:
        (text_embeds, hidden_states, mask), with the unconditional branch first when guiding
        (its prompts: `negative_prompts`, one per prompt, or "" for each)."""
        embeds, states, mask = self._encode_text(prompts, device)
        n = num_images_per_prompt
        embeds, states, mask = (x.repeat_interleave(n, dim=0) for x in (embeds, states, mask))
        if do_classifier_free_guidance:
            negatives = [""] * len(prompts) if negative_prompts is None else negative_prompts
            if len(negatives) != len(prompts):
                raise InputError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                                 f"pass one per prompt, or one for all.")
            u_embeds, u_states, u_mask = (x.repeat_interleave(n, dim=0) for x in self._encode_text(negatives, device))
            embeds, states, mask = torch.cat([u_embeds, embeds]), torch.cat([u_states, states]), torch.cat([u_mask, mask])
        return embeds, states, mask

    # ------------------------------------------------------------------------------------------
    # The loop

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float = 4.0,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        negative_mode: str = "diffusers",
    ):
        prompts = _as_list(prompt, "prompt")
        negatives = _as_list(negative_prompt, "negative_prompt")
        if not prompts:
            raise InputError("Pass at least one prompt.")
        check_positive_int("num_inference_steps", num_inference_steps)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_guidance(guidance_scale)
        check_choice("output_type", output_type, ("pt", "np"))
        check_choice("negative_mode", negative_mode, ("diffusers", "guided"))
        for name in callback_on_step_end_tensor_inputs:
            check_choice("callback_on_step_end_tensor_inputs", name, CALLBACK_TENSORS)
        if negatives is not None and len(negatives) not in (1, len(prompts)):
            raise InputError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                             f"pass one per prompt, or one for all.")
        device = self.device
        do_cfg = guidance_scale > 1.0

        # 1. Text: with a negative prompt the negatives join the batch (see the module docstring),
        #    conditional [prompts, negatives] against unconditional [negatives, negatives] (diffusers)
        #    or [negatives, ""] (guided).
        if negatives is not None:
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives  # one for all
            cond = prompts + negatives
            uncond = negatives + (negatives if negative_mode == "diffusers" else [""] * len(negatives))
        else:
            cond, uncond = prompts, None
        embeds, states, mask = self.encode_prompt(cond, device, num_images_per_prompt, do_cfg, uncond)
        batch = len(cond) * num_images_per_prompt

        # 2. Timesteps: 999, ..., 0 spaced (T - 1) / (n - 1) apart (UnCLIPScheduler).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 3. z_T ~ N(0, I), (B, P).
        shape = (batch, self.prior.config.embedding_dim)
        if latents is None:
            latents = randn(shape, generator, device, embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents must have shape {shape}; got {tuple(latents.shape)}.")
        z_t = latents.to(device=device, dtype=embeds.dtype) * self.scheduler.init_noise_sigma

        # 4. Denoise: the prior predicts z_0 (prediction_type "sample"); each UnCLIP step is told
        #    the next timestep of the grid (None after the last).
        for i, t in enumerate(self.progress_bar(timesteps, desc="prior")):
            z_in = torch.cat([z_t, z_t]) if do_cfg else z_t
            z0 = self.prior(z_in, timestep=t, proj_embedding=embeds, encoder_hidden_states=states,
                            attention_mask=mask).predicted_image_embedding
            if do_cfg:
                z0_uncond, z0_text = z0.chunk(2)
                z0 = z0_uncond + guidance_scale * (z0_text - z0_uncond)
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
            z_t = self.scheduler.step(z0, timestep=t, sample=z_t, generator=generator, prev_timestep=prev_t).prev_sample
            self.check_finite(z_t, "prior", i, len(timesteps), t)
            if callback_on_step_end is not None:  # diffusers' hook: it may replace any tensor it is given
                current = {"latents": z_t, "prompt_embeds": embeds, "text_encoder_hidden_states": states, "text_mask": mask}
                replaced = callback_on_step_end(self, i, t, {k: current[k] for k in callback_on_step_end_tensor_inputs}) or {}
                z_t = replaced.get("latents", z_t)
                embeds = replaced.get("prompt_embeds", embeds)
                states = replaced.get("text_encoder_hidden_states", states)
                mask = replaced.get("text_mask", mask)

        # 5. Back to CLIP's scale; the second half is the negative prompt's sample, if there is one.
        image_embeds = self.prior.post_process_latents(z_t)
        if negatives is None:
            negative_embeds = self.get_zero_embed(image_embeds.shape[0], device=image_embeds.device)
        else:
            image_embeds, negative_embeds = image_embeds.chunk(2)
        if output_type == "np":
            image_embeds, negative_embeds = image_embeds.cpu().float().numpy(), negative_embeds.cpu().float().numpy()
        if not return_dict:
            return image_embeds, negative_embeds
        return KandinskyPriorPipelineOutput(image_embeds=image_embeds, negative_image_embeds=negative_embeds)


# diffusers names the Kandinsky 2.1 prior KandinskyPriorPipeline; in diffusers 0.42 its loop is
# 2.2's without callback_on_step_end (compared line by line), so a folder naming it loads this class.
KandinskyPriorPipeline = KandinskyV22PriorPipeline
