"""DiffEdit: edit the part of an image that a text query is about, with a mask the model finds.

Couairon, Verbeek, Schwenk & Cord 2022, "DiffEdit: Diffusion-based semantic image editing with
mask guidance" (arXiv 2210.11427), sec. 3.2 and fig. 2. Three steps, one method each, in this order:

  Step 1  generate_mask   ("computing editing mask"; return_maps=True: the maps before the 0.5 cut too)
      x_0 = VAE(image); noise it K times (k = 1..K) to the level t_r of `mask_encode_strength` r:
          x_t^k = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise_k           (DDPM eq. 4)
      map  = mean over k and channels of | eps(x_t^k, t, Q) - eps(x_t^k, t, R) |
             (Q: query = target prompt, R: reference = source prompt)
      map <- clamp(map, 0, ratio * mean(map)) / (ratio * mean(map));   mask = map > 0.5
  Step 2  invert          ("encoding")
      DDIM run backwards (eta = 0, DDIM sec. 4.3) from x_0 to t_r of `inpaint_strength`,
      keeping x_t after every step: the encoded trajectory x_{t_1}, ..., x_{t_r}.
  Step 3  __call__        ("decoding with mask guidance")
      DDIM (eq. 12) from y_{t_r} = x_{t_r} with the query text; after each step put the encoded
      latent back outside the mask:   y <- mask * y + (1 - mask) * x    (paper: y~_t = M y_t + (1 - M) x_t)

Where the background latent x comes from (`blend`):
    "diffusers"  what diffusers does, reproduced exactly: after the step t_i -> t_{i+1} it blends
                 with x_{t_i}, the encoded latent of the step it came FROM (one step noisier than the
                 y it just produced), and the last step blends with x_{t_1}, never with x_0. The
                 background therefore keeps one step of noise at the end.
    "aligned"    the paper's rule: blend with x_{t_{i+1}} (the same noise level as y), and with
                 the clean x_0 after the last step, so the unmasked region is x_0 exactly.

Notation (code -> paper): x0 / clean_latents: x_0 = 0.18215 * z, z ~ q(z | image); eps: the UNet's
noise prediction eps_theta; g: guidance_scale (CFG, Ho & Salimans 2022); K: num_maps_per_mask,
the number of noise draws; mask: the paper's M; t_r: the timestep of a strength r, the first of
the last int(n * r) timesteps of an n-step DDIM grid (img2img's rule, validation.steps_for_strength).
Masks in and out: pipelines/images.py. The optional regulariser of `invert` (pix2pix-zero, not in
DiffEdit, off by default): pipelines/inversion_regularizer.py.

References:
    Couairon et al. 2022, DiffEdit, sec. 3.2 (above) and fig. 2
    Song, Meng & Ermon 2021, DDIM, eq. 12 and sec. 4.3 (minidiff/schedulers/ddim.py)
    diffusers' pipeline_stable_diffusion_diffedit.py (behaviour and argument names)

Where diffusers' StableDiffusionDiffEditPipeline (0.42, deprecated) differs; tests/test_diffedit.py
shows each:
  - generate_mask unpacks encode_prompt's (prompt, negative) the wrong way round, so it guides
    towards the negative prompt. With a shared negative (the usual "") that only rescales the
    map and the mask is the same; with different negatives diffusers' mask is ours with each
    prompt swapped with its negative. Here guidance is the usual eps(neg) + g (eps(pos) - eps(neg)).
  - With a shared negative, eps(neg) cancels in the difference and g in the normalisation, so
    the mask needs 2 UNet groups, not diffusers' 4 (`skip_shared_negative`).
  - generate_mask crashes for guidance_scale <= 1 and output_type="pil"; a map that is zero
    everywhere divides 0 by 0 and becomes an all-ones mask. Here: an all-zero mask.
  - __call__ checks nothing about how the inverted latents were made (other step counts or
    strengths give a shape error, diffusers issue 5465): here InversionOutput remembers them.
    It repeats the mask with cat but the latents with repeat_interleave for
    num_images_per_prompt > 1, binarises a tensor mask in place, and ignores `latents`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minidiff.errors import InputError
from minidiff.loading import read_state_dict
from minidiff.pipelines.images import (
    mask_output,
    postprocess,
    preprocess_image,
    preprocess_mask,
)
from minidiff.pipelines.inversion_regularizer import regularise
from minidiff.pipelines.text_to_image import PipelineOutput, StableDiffusionPipeline
from minidiff.schedulers.base import randn
from minidiff.schedulers.ddim import DDIMInverseScheduler
from minidiff.validation import (
    check_choice,
    check_guidance,
    check_number,
    check_positive_int,
    steps_for_strength,
)

BLENDS = ("diffusers", "aligned")
MASK_CLAMPS = ("batch", "per_image")


@dataclass
class MaskMaps:
    """What generate_mask(..., return_maps=True) returns: the mask and the maps it was cut from."""

    mask: Any  # generate_mask's usual output (its output_type)
    differences: torch.Tensor  # (B, K, h, w): |eps_tgt - eps_src| averaged over channels, one per noise draw k
    guidance_map: torch.Tensor  # (B, h, w): the mean over the K draws and the channels
    bound: torch.Tensor  # () for mask_clamp="batch", (B, 1, 1) for "per_image": ratio x mean(guidance_map)
    soft_mask: torch.Tensor  # (B, h, w) in [0, 1]: min(guidance_map, bound) / bound; the mask is soft_mask > 0.5
    timestep: int  # t_r, the noise level of mask_encode_strength


@dataclass
class InversionOutput:
    """What `invert` returns. `latents[:, i]` is the encoded x_t at `timesteps[i]` (index 0 the
    noisiest); the step count and strength travel with them so that __call__ can check them."""

    latents: torch.Tensor  # (B, S, 4, h, w), S = int(num_inference_steps * inpaint_strength)
    images: Any = None  # the S * B decoded latents (b-major) when decode_latents=True
    num_inference_steps: int | None = None
    inpaint_strength: float | None = None
    timesteps: torch.Tensor | None = None  # (S,) descending, the timestep of each latents[:, i]
    clean_latents: torch.Tensor | None = None  # (B, 4, h, w): x_0, where the inversion started

    def __getitem__(self, i):  # `latents, images = pipe.invert(...)` as diffusers' tuple
        return (self.latents, self.images)[i]

    def save(self, path) -> None:
        """One safetensors file: the latents, x_0 and the timesteps, the settings in its metadata."""
        tensors = {"latents": self.latents, "timesteps": self.timesteps}
        if self.clean_latents is not None:
            tensors["clean_latents"] = self.clean_latents
        meta = {"num_inference_steps": str(self.num_inference_steps), "inpaint_strength": str(self.inpaint_strength)}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "InversionOutput":
        """Read a file written by `save` (or `minidiff invert`): __call__ then checks that its
        schedule is the one it runs, which raw latents cannot tell."""
        tensors = read_state_dict([path])
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "latents" not in tensors or "timesteps" not in tensors or "num_inference_steps" not in meta:
            raise InputError(f"{str(path)!r} is not a file of inverted latents (written by `minidiff invert` or "
                             "InversionOutput.save): it lacks 'latents', 'timesteps' or the schedule metadata.")
        return cls(latents=tensors["latents"], num_inference_steps=int(meta["num_inference_steps"]),
                   inpaint_strength=float(meta["inpaint_strength"]), timesteps=tensors["timesteps"],
                   clean_latents=tensors.get("clean_latents"))


class DiffEditPipeline(StableDiffusionPipeline):
    """Stable Diffusion + DiffEdit: `generate_mask`, `invert`, then `__call__`.

        mask = pipe.generate_mask(image=img, source_prompt="a bowl of fruits", target_prompt="a bowl of pears")
        inv = pipe.invert(image=img, prompt="a bowl of fruits")
        edited = pipe(prompt="a bowl of pears", mask_image=mask, image_latents=inv).images[0]

    `inverse_scheduler` (DDIM run backwards) is built from the scheduler's config when not given.
    """

    _diffusers_class_name = "StableDiffusionDiffEditPipeline"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 inverse_scheduler=None, requires_safety_checker: bool = False):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         requires_safety_checker=requires_safety_checker)
        if inverse_scheduler is None:
            inverse_scheduler = DDIMInverseScheduler.from_config(scheduler.config)
        self.inverse_scheduler = inverse_scheduler

    # ------------------------------------------------------------------------------------------
    # Step 1: the mask

    @torch.no_grad()
    def generate_mask(
        self,
        image=None,
        target_prompt: str | list[str] | None = None,
        target_negative_prompt: str | list[str] | None = None,
        target_prompt_embeds: torch.Tensor | None = None,
        target_negative_prompt_embeds: torch.Tensor | None = None,
        source_prompt: str | list[str] | None = None,
        source_negative_prompt: str | list[str] | None = None,
        source_prompt_embeds: torch.Tensor | None = None,
        source_negative_prompt_embeds: torch.Tensor | None = None,
        num_maps_per_mask: int = 10,
        mask_encode_strength: float = 0.5,
        mask_thresholding_ratio: float = 3.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        mask_clamp: str = "batch",
        skip_shared_negative: bool = True,
        return_maps: bool = False,
    ):
        """DiffEdit step 1: where do the source and target prompts disagree about the noise?

        Returns the mask at latent size (B, H/f, W/f), f = vae_scale_factor: an int64 numpy array
        of 0/1 ("np", as diffusers), a list of L-mode PIL images with 0/255 ("pil", for any
        inpainting tool) or a float tensor ("pt"). 1 marks the region to edit.

        mask_clamp: "batch" clamps every map at `mask_thresholding_ratio` x the mean over the
            whole batch (diffusers); "per_image" uses each image's own mean, which is what a batch
            of unrelated images needs (then an image's mask does not depend on its batch-mates).
        generator: one generator, one per image, or one per noise draw (B * num_maps_per_mask,
            as diffusers); the posterior samples are drawn first, then the noise.
        skip_shared_negative: with the same negative prompt for source and target, run 2 UNet
            groups instead of diffusers' 4 (the same mask, see below); False runs all 4.
        return_maps: return a MaskMaps instead (the maps before the 0.5 cut, and the mask).
        """
        check_positive_int("num_maps_per_mask", num_maps_per_mask)
        check_number("mask_thresholding_ratio", mask_thresholding_ratio, low=0, low_open=True)
        check_guidance(guidance_scale)
        check_choice("mask_clamp", mask_clamp, MASK_CLAMPS)
        check_choice("output_type", output_type, ("np", "pil", "pt"))
        k_steps = steps_for_strength(num_inference_steps, mask_encode_strength, "mask_encode_strength")
        pixels = self._images(image)
        B, K = pixels.shape[0], num_maps_per_mask
        do_cfg = guidance_scale > 1.0

        # Text: every prompt repeated K times, once per noise draw: (B*K, 77, D).
        c_tgt, c_tgt_neg = self._text(target_prompt, target_negative_prompt, target_prompt_embeds,
                                      target_negative_prompt_embeds, B, K, do_cfg, "target_prompt")
        c_src, c_src_neg = self._text(source_prompt, source_negative_prompt, source_prompt_embeds,
                                      source_negative_prompt_embeds, B, K, do_cfg, "source_prompt")

        # The noise level t_r: where an n-step DDIM edit of strength r would start.
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        t = self.scheduler.timesteps[num_inference_steps - k_steps]

        # K noisy versions of each image (DDPM eq. 4), each from its own posterior sample z.
        if isinstance(generator, list) and len(generator) == B and K > 1:
            generator = [g for g in generator for _ in range(K)]  # one per image -> one per draw
        x0 = self._encode_image(pixels, generator, repeats=K)  # (B*K, 4, h, w)
        noise = randn(x0.shape, generator, self.device, x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t).to(self.dtype)
        x_t = self.scheduler.scale_model_input(x_t, t)

        # eps under the source (R) and target (Q) prompts, with classifier-free guidance
        # eps = eps(neg) + g (eps(pos) - eps(neg)). With the same negative for both, eps(neg)
        # cancels in eps_tgt - eps_src = g (eps(Q) - eps(R)), and g cancels in the normalisation
        # below: two UNet groups give the same mask as four.
        if not do_cfg or (skip_shared_negative and torch.equal(c_src_neg, c_tgt_neg)):
            eps = self.unet(torch.cat([x_t, x_t]), t, torch.cat([c_src, c_tgt])).sample  # (2*B*K, 4, h, w)
            eps_src, eps_tgt = eps.chunk(2)
        else:
            eps = self.unet(torch.cat([x_t] * 4), t, torch.cat([c_src_neg, c_src, c_tgt_neg, c_tgt])).sample
            eps_src_neg, eps_src, eps_tgt_neg, eps_tgt = eps.chunk(4)
            eps_src = eps_src_neg + guidance_scale * (eps_src - eps_src_neg)
            eps_tgt = eps_tgt_neg + guidance_scale * (eps_tgt - eps_tgt_neg)

        # Average |difference| over the K draws and the 4 channels, clamp at ratio x mean, rescale
        # to [0, 1] and binarise at 0.5 (DiffEdit sec. 3.2, step 1).
        diff = (eps_tgt - eps_src).abs().float()  # (B*K, 4, h, w)
        self.check_finite(diff, "the DiffEdit mask", 0, 1, t)
        diff = diff.reshape(B, K, *diff.shape[1:])  # (B, K, 4, h, w)
        guidance_map = diff.mean(dim=(1, 2))  # (B, h, w)
        if mask_clamp == "batch":
            bound = guidance_map.mean() * mask_thresholding_ratio
        else:
            bound = guidance_map.mean(dim=(1, 2), keepdim=True) * mask_thresholding_ratio  # (B, 1, 1)
        # A map that is 0 everywhere (source = target) has bound 0: an empty mask rather than 0 / 0.
        soft_mask = torch.minimum(guidance_map, bound) / bound.clamp_min(torch.finfo(bound.dtype).tiny)  # in [0, 1]
        mask = mask_output(soft_mask > 0.5, output_type)  # (B, h, w)
        if not return_maps:
            return mask
        return MaskMaps(mask=mask, differences=diff.mean(dim=2), guidance_map=guidance_map, bound=bound,
                        soft_mask=soft_mask, timestep=int(t))

    # ------------------------------------------------------------------------------------------
    # Step 2: encoding by DDIM inversion

    @torch.no_grad()
    def invert(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        num_inference_steps: int = 50,
        inpaint_strength: float = 0.8,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        decode_latents: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        lambda_auto_corr: float = 20.0,
        lambda_kl: float = 20.0,
        num_reg_steps: int = 0,
        num_auto_corr_rolls: int = 5,
    ):
        """DiffEdit step 2: run DDIM backwards from the image's latent x_0 up to `inpaint_strength`.

        Returns an InversionOutput: `.latents` (B, S, 4, h, w) with S = int(n * inpaint_strength),
        index 0 the noisiest (diffusers' order), plus `.num_inference_steps`, `.inpaint_strength`,
        `.timesteps` and `.clean_latents` (x_0). Pass the whole object to __call__.

        num_reg_steps > 0 turns on pix2pix-zero's regulariser of the noise prediction
        (inversion_regularizer.py; `lambda_auto_corr`, `num_auto_corr_rolls`: auto-correlation;
        `lambda_kl`: KL to N(0, 1)). Its random shifts come from `generator`, after the posterior
        sample. callback(i, t, x_t, eps) runs every `callback_steps` steps.
        """
        check_positive_int("callback_steps", callback_steps)
        k_steps = steps_for_strength(num_inference_steps, inpaint_strength, "inpaint_strength")
        pixels = self._images(image)
        B = pixels.shape[0]
        check_guidance(guidance_scale)
        do_cfg = guidance_scale > 1.0

        x0 = self._encode_image(pixels, generator).to(self.dtype)  # (B, 4, h, w)
        c, c_neg = self._text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, B, 1, do_cfg)
        context = torch.cat([c_neg, c]) if do_cfg else c  # (2B, 77, D): unconditional first

        # The k least noisy timesteps of the n-step grid, ascending: t_1 < t_2 < ... < t_r.
        self.inverse_scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.inverse_scheduler.timesteps[:k_steps]

        x_t = x0
        trajectory = []
        for i, t in enumerate(self.progress_bar(timesteps, desc="DiffEdit invert")):
            x_in = torch.cat([x_t, x_t]) if do_cfg else x_t
            x_in = self.inverse_scheduler.scale_model_input(x_in, t)
            eps = self.unet(x_in, t, context).sample  # evaluated at the noisier level t (DDIM sec. 4.3)
            if do_cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            if num_reg_steps > 0:
                eps = regularise(eps, x_t, t, self.inverse_scheduler, generator, lambda_auto_corr, lambda_kl,
                                 num_reg_steps, num_auto_corr_rolls)
            # DDIM eq. 12 with eta = 0, solved for the noisier sample: x_{t_prev} -> x_t
            x_t = self.inverse_scheduler.step(eps, t, x_t).prev_sample
            self.check_finite(x_t, "DiffEdit invert", i, len(timesteps), t)
            trajectory.append(x_t)
            if callback is not None and i % callback_steps == 0:
                callback(i, t, x_t, eps)

        latents = torch.stack(trajectory[::-1], dim=1)  # (B, k, 4, h, w), noisiest first
        images = None
        if decode_latents:
            images = postprocess(self.decode_latents(latents.flatten(0, 1)), output_type)  # (B*k, ...)
        if not return_dict:
            return latents, images
        return InversionOutput(latents=latents, images=images, num_inference_steps=num_inference_steps,
                               inpaint_strength=inpaint_strength, timesteps=timesteps.flip(0).cpu(),
                               clean_latents=x0)

    # ------------------------------------------------------------------------------------------
    # Step 3: decoding with mask guidance

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        mask_image=None,
        image_latents: InversionOutput | torch.Tensor | None = None,
        inpaint_strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        clip_skip: int | None = None,
        blend: str = "diffusers",
    ):
        """DiffEdit step 3: DDIM from the noisiest inverted latent with the target prompt, putting
        the inverted latents back outside the mask after every step.

        prompt: the target (query) text; negative_prompt: usually the source text.
        mask_image: generate_mask's output (or any 0/1 mask at latent size; 1 = repaint).
        image_latents: invert()'s output (preferred: its step count and strength are checked), or
            its `.latents` tensor (B, S, 4, h, w); invert and this call need the same
            num_inference_steps and inpaint_strength.
        blend: "diffusers" blends with the inverted latent of the step just left (one step
            noisier) and never with x_0, reproducing diffusers exactly; "aligned" blends with
            the inverted latent at the level just reached and with x_0 at the end, so the
            unmasked region is the original latent exactly (needs invert()'s output object).
        num_images_per_prompt > 1 only differs from copies when eta > 0 (DDIM is deterministic).
        callback(i, t, x_t, eps) runs every `callback_steps` steps. output_type: "pil", "np",
        "pt" or "latent".
        """
        check_choice("blend", blend, BLENDS)
        check_choice("output_type", output_type, ("pil", "np", "pt", "latent"))
        check_positive_int("callback_steps", callback_steps)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        k_steps = steps_for_strength(num_inference_steps, inpaint_strength, "inpaint_strength")
        check_guidance(guidance_scale)
        do_cfg = guidance_scale > 1.0

        # The k least noisy timesteps of the n-step grid, descending: the reverse of invert's.
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps[num_inference_steps - k_steps:]
        inverted, x0 = self._inverted_latents(image_latents, timesteps, num_inference_steps, inpaint_strength, blend)
        B, _, _, h, w = inverted.shape
        mask = preprocess_mask(mask_image, B, (h, w))  # (B, 1, h, w)
        if not mask.any():
            warnings.warn("The mask is empty: nothing to edit, the result is the inverted image decoded. Lower "
                          "mask_thresholding_ratio or raise mask_encode_strength in generate_mask.", stacklevel=2)

        c, c_neg = self._text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, B,
                              num_images_per_prompt, do_cfg, clip_skip=clip_skip)
        context = torch.cat([c_neg, c]) if do_cfg else c  # (2N, 77, D), N = B * num_images_per_prompt
        n = num_images_per_prompt  # copies of each image stay adjacent, like the prompts
        inverted = inverted.repeat_interleave(n, dim=0).to(device=self.device, dtype=c.dtype)  # (N, k, 4, h, w)
        mask = mask.repeat_interleave(n, dim=0).to(device=self.device, dtype=c.dtype)  # (N, 1, h, w)
        if x0 is not None:
            x0 = x0.repeat_interleave(n, dim=0).to(device=self.device, dtype=c.dtype)
        step_kwargs = self._step_kwargs(eta, generator)

        y_t = inverted[:, 0].clone()  # start from the encoded x_{t_r}
        for i, t in enumerate(self.progress_bar(timesteps, desc="DiffEdit edit")):
            y_in = torch.cat([y_t, y_t]) if do_cfg else y_t
            y_in = self.scheduler.scale_model_input(y_in, t)
            eps = self.unet(y_in, t, context).sample
            if do_cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            y_t = self.scheduler.step(eps, t, y_t, **step_kwargs).prev_sample  # DDIM eq. 12: t_i -> t_{i+1}
            self.check_finite(y_t, "DiffEdit edit", i, len(timesteps), t)
            # Mask guidance (DiffEdit step 3): keep the edit inside, the encoded image outside.
            if blend == "diffusers":
                background = inverted[:, i]  # x at t_i: the level y_t just LEFT (diffusers)
            else:
                background = inverted[:, i + 1] if i + 1 < k_steps else x0  # x at the level y_t is at now
            y_t = y_t * mask + background * (1 - mask)
            if callback is not None and i % callback_steps == 0:
                callback(i, t, y_t, eps)

        if output_type == "latent":
            images = y_t
        else:
            images = postprocess(self.decode_latents(y_t), output_type)
        return PipelineOutput(images) if return_dict else (images, None)

    # ------------------------------------------------------------------------------------------
    # What the three steps share: images -> x_0, prompts -> embeddings, inverted latents checked

    def _images(self, image) -> torch.Tensor:
        if image is None:
            raise InputError("`image` is required (a PIL image, a numpy array or a tensor, or a list of them).")
        pixels = preprocess_image(image, multiple=1)  # (B, 3, H, W) in [-1, 1]
        self.check_image_size(*pixels.shape[-2:])  # the one size rule (images.py)
        return pixels

    def _encode_image(self, image: torch.Tensor, generator, repeats: int = 1) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> x_0 = scaling_factor * z, z ~ q(z | image), one
        independent sample per repeat: (B * repeats, 4, H/f, W/f), repeats of an image adjacent.
        The encoder runs once per image; diffusers encodes every repeat (same mean and std)."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(image.to(device=self.device, dtype=vae_dtype)).latent_dist
        mean = posterior.mean.repeat_interleave(repeats, dim=0)  # (B*repeats, 4, h, w)
        std = posterior.std.repeat_interleave(repeats, dim=0)
        z = mean + std * randn(mean.shape, generator, self.device, mean.dtype)  # reparameterisation
        return self.vae.config.scaling_factor * z

    def _text(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, batch: int, repeats: int,
              do_cfg: bool, what: str = "prompt", clip_skip: int | None = None):
        """Embeddings (batch * repeats, 77, D) for `batch` images; one prompt is used for all images."""
        if prompt is not None and prompt_embeds is not None:
            raise InputError(f"Pass `{what}` or `{what}_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise InputError(f"Pass `{what}` (text) or `{what}_embeds` (its CLIP embeddings).")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise InputError(f"`{what}` must be a string or a list of strings; got {type(prompt).__name__}.")
        count = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if count not in (1, batch):
            raise InputError(
                f"Got {count} {what}s for {batch} image(s): pass one {what} per image, or a single one for all "
                f"(to make several edits of one image, repeat the image)."
            )
        if count == 1 and batch > 1:  # one prompt for every image
            if prompt is not None:
                prompt = [prompt if isinstance(prompt, str) else prompt[0]] * batch
            else:
                prompt_embeds = prompt_embeds.repeat(batch, 1, 1)
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] == 1:
                negative_prompt_embeds = negative_prompt_embeds.repeat(batch, 1, 1)
        return self.encode_prompt(prompt, self.device, repeats, do_cfg, negative_prompt, prompt_embeds,
                                  negative_prompt_embeds, clip_skip)

    def _inverted_latents(self, image_latents, timesteps: torch.Tensor, num_inference_steps: int,
                          inpaint_strength: float, blend: str):
        """image_latents (InversionOutput, (B, S, 4, h, w) tensor or a list of them) ->
        (latents (B, S, 4, h, w), clean x_0 or None), checked against this call's timesteps."""
        clean = None
        if image_latents is None:
            raise InputError("`image_latents` is required: compute them with `pipe.invert(...)`.")
        if isinstance(image_latents, InversionOutput):
            inv = image_latents
            if inv.timesteps is not None and not torch.equal(inv.timesteps.cpu(), timesteps.cpu()):
                raise InputError(
                    f"These latents were inverted with num_inference_steps={inv.num_inference_steps}, "
                    f"inpaint_strength={inv.inpaint_strength} ({len(inv.timesteps)} steps at timesteps "
                    f"{inv.timesteps.tolist()}), but this call uses num_inference_steps={num_inference_steps}, "
                    f"inpaint_strength={inpaint_strength} ({len(timesteps)} steps at {timesteps.tolist()}). "
                    f"Pass the same num_inference_steps and inpaint_strength to invert() and to the pipeline."
                )
            latents, clean = inv.latents, inv.clean_latents
        elif isinstance(image_latents, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in image_latents):
            latents = torch.cat(list(image_latents))
        elif isinstance(image_latents, torch.Tensor):
            latents = image_latents
        else:
            raise InputError(f"`image_latents` must be invert()'s output or a tensor; "
                             f"got {type(image_latents).__name__}.")
        if latents.ndim != 5:
            raise InputError(f"`image_latents` must be shaped (B, steps, {self.unet.config.in_channels}, h, w) as "
                             f"invert() returns them; got shape {tuple(latents.shape)}.")
        if latents.shape[1] != len(timesteps):
            raise InputError(
                f"`image_latents` holds {latents.shape[1]} inverted latents per image, but num_inference_steps="
                f"{num_inference_steps} with inpaint_strength={inpaint_strength} takes {len(timesteps)} steps. Pass "
                f"the same num_inference_steps and inpaint_strength as to invert() (or pass invert()'s output "
                f"object, which remembers them)."
            )
        if blend == "aligned" and clean is None:
            raise InputError("blend='aligned' needs the clean latent x_0, which only invert()'s output object "
                             "carries: pass `image_latents=pipe.invert(...)`, not its `.latents`.")
        return latents.detach(), clean


# diffusers names this pipeline StableDiffusionDiffEditPipeline; the same class under that name, so
# `from minidiff import StableDiffusionDiffEditPipeline` runs diffusers code unchanged.
StableDiffusionDiffEditPipeline = DiffEditPipeline
