"""DDPM: ancestral sampling from the posterior q(x_{t-1} | x_t, x_0) (Ho, Jain & Abbeel 2020).

Each step asks the model for x_0 (via eps, v or x_0 itself), puts it into the Gaussian posterior
of the forward process, and samples from it:

    eq. 15   x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    eq. 7    mean    = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0
                     + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
             beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t     (posterior variance)
             x_{t-1} = mean + sigma_t z,   z ~ N(0, I), no noise at t = 0

With n < T inference steps, t-1 stands for the previous timestep of the grid and beta_t for the
beta of that whole jump: alpha_t = alpha_bar_t / alpha_bar_{t-1}, beta_t = 1 - alpha_t.

`variance_type` picks sigma_t^2:
    fixed_small       beta_tilde_t (the posterior variance; Ho et al. sec. 3.2)
    fixed_small_log   the same, computed via log in the original code
    fixed_large       beta_t (Ho et al. sec. 3.2: "similar results")
    fixed_large_log   the same as fixed_large (GLIDE's log form). diffusers 0.42 takes the square
                      root of log(beta_t) < 0 here and returns NaN; minidiff returns the intended value.
    learned           the model outputs sigma_t^2 itself in extra channels
    learned_range     the model outputs v in [-1, 1]: log sigma_t^2 = frac log beta_t + (1 - frac)
                      log beta_tilde_t, frac = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15)
For the learned types the model output has 2x the sample's channels: [prediction, variance].

References:
    Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (eq. 4, 7, 15)
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (eq. 15, 17)
    prediction types, thresholding, zero terminal SNR: see base.py and betas.py
"""

from __future__ import annotations

import math

import numpy as np
import torch

from minidiff.errors import InputError
from minidiff.schedulers.base import Scheduler, SchedulerOutput
from minidiff.validation import check_choice

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(Scheduler):
    """DDPM sampler; also the scheduler used for training (`add_noise`, `get_velocity`)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._setup(locals())
        self.variance_type = variance_type
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # until set_timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Either n evenly spaced timesteps (see `_spaced_timesteps`) or your own descending list."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise InputError("Pass exactly one of num_inference_steps or timesteps to set_timesteps.")
        if timesteps is not None:
            t = np.asarray(timesteps, dtype=np.int64)
            if t.ndim != 1 or len(t) == 0:
                raise InputError(f"timesteps must be a non-empty list of integers, got {timesteps!r}.")
            if np.any(t[1:] >= t[:-1]):
                raise InputError(f"Custom timesteps must be strictly descending, got {t.tolist()}.")
            if t[0] >= T or t[-1] < 0:
                raise InputError(f"Custom timesteps must lie in [0, {T - 1}] (num_train_timesteps={T}), got {t.tolist()}.")
            self.custom_timesteps = True
        else:
            self._check_num_inference_steps(num_inference_steps)
            t = self._spaced_timesteps(int(num_inference_steps))
            self.custom_timesteps = False
        self.num_inference_steps = len(t)
        self.timesteps = torch.from_numpy(t.copy()).to(device)

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep of the grid (the one after `timestep` in `self.timesteps`), -1 after the last."""
        where = (self.timesteps.cpu() == int(timestep)).nonzero()
        if len(where) == 0:
            raise InputError(
                f"Timestep {int(timestep)} is not one of this scheduler's timesteps {self.timesteps.tolist()}; "
                "step through `scheduler.timesteps` after set_timesteps."
            )
        i = int(where[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def _sigma(self, beta_t: float, beta_tilde: float, predicted_variance):
        """sigma_t (a float, or a tensor for the learned types) for `variance_type`."""
        kind = self.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            return beta_tilde**0.5
        if kind in ("fixed_large", "fixed_large_log"):
            return beta_t**0.5
        if kind == "learned":  # the model's sigma_t^2
            return predicted_variance**0.5
        # learned_range (Nichol & Dhariwal eq. 15): interpolate log-variances between the bounds
        frac = (predicted_variance + 1) / 2
        log_var = frac * math.log(beta_t) + (1 - frac) * math.log(beta_tilde)
        return torch.exp(0.5 * log_var)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        variance_noise: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1}. The noise z comes from `generator` (drawn only when
        t > 0, as diffusers does), or is given as `variance_noise`."""
        self._check_ready()
        x_t = sample
        t = int(timestep)
        prev_t = self.previous_timestep(t)

        predicted_variance = None
        if self.variance_type in ("learned", "learned_range"):
            C = x_t.shape[1]
            if model_output.shape[1] != 2 * C:
                raise InputError(
                    f"variance_type={self.variance_type!r} needs a model output with 2 x {C} channels "
                    f"(prediction, then variance); got {model_output.shape[1]} channels."
                )
            model_output, predicted_variance = model_output.split(C, dim=1)  # 2 x (B, C, H, W)

        alpha_bar_t = self._alpha_bar(t)
        alpha_bar_prev = self._alpha_bar(prev_t) if prev_t >= 0 else 1.0
        alpha_t = alpha_bar_t / alpha_bar_prev  # alpha of the whole jump t -> prev_t
        beta_t = 1 - alpha_t

        # eq. 15 (or the v / x_0 parameterisation), then optional clipping / thresholding
        x0, _ = self.predict_x0_and_eps(model_output, x_t, alpha_bar_t)
        x0 = self._clip_or_threshold(x0)

        # eq. 7: posterior mean of q(x_{t-1} | x_t, x_0)
        x0_coeff = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
        xt_coeff = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        x_prev = x0_coeff * x0 + xt_coeff * x_t

        if t > 0:  # (with steps_offset=1 the last timestep is 1, so it gets noise too, as in diffusers)
            # eq. 7: posterior variance beta_tilde_t, floored at 1e-20 so that its log is finite
            beta_tilde = max((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t, 1e-20)
            sigma_t = self._sigma(beta_t, beta_tilde, predicted_variance)
            x_prev = x_prev + sigma_t * self._variance_noise(model_output, generator, variance_noise)

        if not return_dict:
            return x_prev, x0
        return SchedulerOutput(prev_sample=x_prev, pred_original_sample=x0)
