"""UnCLIP: the DDPM sampler of the karlo and Kandinsky 2.2 priors (diffusers' UnCLIPScheduler).

It is DDPM ancestral sampling (see ddpm.py) with the cosine schedule, on a grid that always runs
from T - 1 down to 0, each step told which timestep comes next:

    timesteps   round(i (T - 1) / (n - 1)) for i = n - 1, ..., 0: 999, ..., 0 inclusive (karlo's
                spacing, the "linspace" spacing of base.py); n >= 2
    eq. 15      x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   ("epsilon"), or the
                model's output itself ("sample", what the Kandinsky 2.2 prior predicts); clipped
                to [-clip_sample_range, clip_sample_range] when clip_sample (Kandinsky: +-10)
    eq. 7       mean = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x0
                     + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t
                beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t   (posterior variance)
                x_prev = mean + sigma_t z,   z ~ N(0, I), no noise at t = 0

t -> prev_t is one jump of the grid (prev_t = -1 after t = 0, where alpha_bar_prev = 1), and
beta_t is the beta of that whole jump, alpha_t = alpha_bar_t / alpha_bar_prev. When the jump is a
single training step (prev_t = t - 1) the float32 training tables betas[t] and alphas[t] are used
instead, as diffusers does; at the last step (t = 0 -> -1) that makes the x0 coefficient
betas[0] / (1 - alphas[0]) = 0.99947, not 1: float32 rounding of alphas[0] = 1 - 4.1e-5.

`prev_timestep=None` means t - 1, as in diffusers, whatever grid set_timesteps chose: a loop over
a coarse grid must pass the next grid timestep (the prior pipeline does), or each step uses the
noise level of a single training step.

`variance_type` picks sigma_t, a standard deviation:
    fixed_small_log   sigma_t = exp(0.5 log beta_tilde_t), beta_tilde_t floored at 1e-20
                      (Ho et al. 2020, sec. 3.2: the posterior variance, in GLIDE's log form)
    learned_range     the model outputs v in [-1, 1] in extra channels (output = [prediction, v],
                      2x the sample's channels, split along dim 1):
                      log sigma_t^2 = frac log beta_t + (1 - frac) log beta_tilde_t,
                      frac = (v + 1) / 2, sigma_t = exp(0.5 log sigma_t^2)  (Nichol & Dhariwal 2021, eq. 15)

References:
    Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (eq. 4, 7, 15)
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (eq. 15, 17)
    Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents" (unCLIP);
        Kakao Brain's karlo, the implementation whose spacing and variance this follows
"""

from __future__ import annotations

import math

import numpy as np
import torch

from minidiff.errors import InputError
from minidiff.schedulers.base import Scheduler, SchedulerConfig, SchedulerOutput, randn
from minidiff.schedulers.betas import cosine_betas
from minidiff.validation import check_choice

VARIANCE_TYPES = ("fixed_small_log", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample")


class UnCLIPScheduler(Scheduler):
    """The Kandinsky 2.2 / karlo prior's sampler. Build it from the checkpoint's config
    (`UnCLIPScheduler.from_pretrained(path, subfolder="scheduler")`): Kandinsky 2.2 predicts x_0
    ("sample") and clips it to +-10, not the defaults here, which are diffusers'."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        variance_type: str = "fixed_small_log",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        prediction_type: str = "epsilon",
        beta_schedule: str = "squaredcos_cap_v2",
    ):
        options = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if beta_schedule != "squaredcos_cap_v2":
            raise InputError(
                f"UnCLIPScheduler supports only beta_schedule 'squaredcos_cap_v2' (the cosine schedule the "
                f"unCLIP priors were trained with), got {beta_schedule!r}; use DDPMScheduler for other schedules."
            )
        self.config = SchedulerConfig(options)
        self.betas = cosine_betas(num_train_timesteps)  # Nichol & Dhariwal eq. 17, float32, (T,)
        self.alphas = 1.0 - self.betas  # alpha_t = 1 - beta_t
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t
        self.variance_type = variance_type
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # until set_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """n timesteps from T - 1 down to 0 inclusive, (T - 1) / (n - 1) apart, rounded half to even."""
        T, n = self.config.num_train_timesteps, num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 2 <= n <= T:
            # n = 1 would space a single point (T - 1) / 0 apart (diffusers raises ZeroDivisionError).
            raise InputError(
                f"UnCLIPScheduler needs a whole number of inference steps between 2 and num_train_timesteps "
                f"({T}), because its grid always runs from {T - 1} down to 0 and visits each training step at "
                f"most once; got {n!r}."
            )
        self.num_inference_steps = int(n)
        t = np.linspace(0, T - 1, self.num_inference_steps).round()[::-1].astype(np.int64)
        self.timesteps = torch.from_numpy(t.copy()).to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        prev_timestep: int | torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t -> x_{prev_t}; prev_timestep=None means t - 1. The noise z is drawn
        from `generator` only when t > 0, as diffusers draws it."""
        x_t, T = sample, self.config.num_train_timesteps
        t = int(timestep)
        prev_t = t - 1 if prev_timestep is None else int(prev_timestep)
        if not 0 <= t < T or not -1 <= prev_t < t:
            raise InputError(
                f"UnCLIPScheduler.step needs 0 <= timestep < {T} and -1 <= prev_timestep < timestep (the next, "
                f"less noisy timestep of the grid, -1 after the last); got timestep={t}, prev_timestep={prev_t}."
            )

        v = None  # learned_range's interpolation value, (B, C, ...)
        C = x_t.shape[1]
        if self.variance_type == "learned_range":
            if model_output.shape[1] != 2 * C:
                raise InputError(
                    f"variance_type='learned_range' needs a model output with 2 x {C} channels (prediction, "
                    f"then variance); got {model_output.shape[1]} channels."
                )
            model_output, v = model_output.split(C, dim=1)  # 2 x (B, C, ...)
        if model_output.shape != x_t.shape:
            raise InputError(
                f"The model output has shape {tuple(model_output.shape)} but the sample has shape "
                f"{tuple(x_t.shape)}; with variance_type={self.variance_type!r} they must be equal."
            )

        alpha_bar_t = self._alpha_bar(t)
        alpha_bar_prev = self._alpha_bar(prev_t) if prev_t >= 0 else 1.0
        if prev_t == t - 1:  # one training step: the float32 tables themselves, as diffusers does
            beta_t, alpha_t = float(self.betas[t]), float(self.alphas[t])
        else:  # a jump of several training steps: the beta of the whole jump
            beta_t = 1 - alpha_bar_t / alpha_bar_prev
            alpha_t = 1 - beta_t

        # eq. 15 ("epsilon") or x_0 itself ("sample"), then clipping to the data range
        x0, _ = self.predict_x0_and_eps(model_output, x_t, alpha_bar_t)
        x0 = self._clip_or_threshold(x0)

        # eq. 7: posterior mean of q(x_prev | x_t, x_0)
        x0_coeff = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
        xt_coeff = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        x_prev = x0_coeff * x0 + xt_coeff * x_t

        if t > 0:
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t  # eq. 7 posterior variance
            # Floored at 1e-20 so the log is finite; beta_tilde is that small only for a jump
            # straight to x_0 (prev_timestep=-1 at t > 0), where diffusers' learned_range, unfloored,
            # gives sigma_t = 0 (or NaN where v = 1).
            log_beta_tilde = math.log(max(beta_tilde, 1e-20))
            if self.variance_type == "fixed_small_log":
                sigma_t = math.exp(0.5 * log_beta_tilde)  # sqrt(beta_tilde_t), in the log form
            else:  # learned_range (Nichol & Dhariwal eq. 15): between log beta_tilde_t and log beta_t
                frac = (v + 1) / 2
                sigma_t = torch.exp(0.5 * (frac * math.log(beta_t) + (1 - frac) * log_beta_tilde))
            x_prev = x_prev + sigma_t * z

        if not return_dict:
            return x_prev, x0
        return SchedulerOutput(prev_sample=x_prev, pred_original_sample=x0)
