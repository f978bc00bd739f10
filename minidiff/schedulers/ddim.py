"""DDIM: deterministic (or partly stochastic) sampling in few steps, and DDIM inversion.

Song, Meng & Ermon (2021) keep DDPM's training but change the sampler: x_{t-1} is built from the
model's guess of x_0 and of the noise, so any subsequence of the T training steps can be used
and, with eta = 0, the map noise -> image is deterministic (an Euler step of an ODE, sec. 4.3).
Running that ODE the other way (DDIMInverseScheduler) maps an image to the noise that DDIM turns
back into it, which DiffEdit and other editing methods use.

Notation (code -> paper). The DDIM paper writes alpha_t for what DDPM calls alpha_bar_t; the code
keeps DDPM's name.
    T, n             num_train_timesteps, num_inference_steps
    t, prev_t        the current timestep and the next one on the sampling grid, t - T // n
    alpha_bar_t      alpha_t of DDIM: prod_{s<=t} (1 - beta_s), the signal fraction of x_t
    alpha_bar_prev   alpha_{t-1} of DDIM: the same at prev_t (`final_alpha_cumprod` below 0)
    x_t, x_prev      x_t and x_{t-1}
    eps              eps_theta^(t)(x_t), the predicted noise
    x0               f_theta^(t)(x_t) = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t), "predicted x_0" (eq. 9)
    sigma_t, eta     sigma_t(eta) of eq. 16: eta = 0 is DDIM, eta = 1 is DDPM's posterior std
    dir_xt           sqrt(1 - alpha_{t-1} - sigma_t^2) eps, the "direction pointing to x_t"
    noise            eps_t ~ N(0, I), the fresh noise of eq. 12

    eq. 12   x_{t-1} = sqrt(alpha_{t-1}) x0 + sqrt(1 - alpha_{t-1} - sigma_t^2) eps + sigma_t noise
    eq. 16   sigma_t(eta) = eta sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_{t-1})

Behaviour follows diffusers' DDIMScheduler / DDIMInverseScheduler, including its quirks, so the
two agree step for step: prev_t is always t - T // n (also for "trailing"/"linspace" grids, whose
points are not exactly T // n apart), and the inverse scheduler evaluates alpha_bar at
t - T // n for the sample it is given.

References:
    Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (eq. 12, eq. 16, sec. 4.3)
    Salimans & Ho 2022 (v-prediction), Lin et al. 2023 (zero terminal SNR, trailing spacing),
    Saharia et al. 2022 (dynamic thresholding): see base.py and betas.py
"""

from __future__ import annotations

import warnings

import torch

from minidiff.errors import InputError
from minidiff.schedulers.base import Scheduler, SchedulerOutput


class DDIMScheduler(Scheduler):
    """DDIM sampler. Defaults are diffusers'; Stable Diffusion's differ, so build it from the
    checkpoint's scheduler_config.json (`DDIMScheduler.from_pretrained(path, subfolder="scheduler")`)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._setup(locals())
        # After the last step there is no alpha_bar_{t-1}: use 1 (a clean x_0) or alpha_bar_0.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # until set_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the n timesteps of the sampling loop (descending), see `_spaced_timesteps`."""
        self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(self._spaced_timesteps(self.num_inference_steps).copy()).to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (eq. 12). With eta > 0 fresh noise is added, drawn from
        `generator` or given as `variance_noise` (the same shape as `sample`)."""
        self._check_ready()
        if eta < 0:
            raise InputError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like); got {eta}.")
        x_t = sample
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_bar_t = self._alpha_bar(t)
        alpha_bar_prev = self._alpha_bar(prev_t) if prev_t >= 0 else float(self.final_alpha_cumprod)

        # eq. 9 / first term of eq. 12: the model's x_0 and eps (any prediction_type), then
        # optional clipping or dynamic thresholding of x_0.
        x0, eps = self.predict_x0_and_eps(model_output, x_t, alpha_bar_t)
        x0 = self._clip_or_threshold(x0)
        if use_clipped_model_output:  # eps consistent with the clipped x0 (as GLIDE does)
            eps = (x_t - alpha_bar_t**0.5 * x0) / (1 - alpha_bar_t) ** 0.5

        # eq. 16: sigma_t(eta); eta = 1 gives the DDPM posterior std sqrt(beta_tilde_t) (DDPM eq. 7)
        posterior_var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_t = eta * posterior_var**0.5
        dir_scale_sq = 1 - alpha_bar_prev - sigma_t**2
        if dir_scale_sq < -1e-12:
            raise InputError(
                f"eta={eta} is too large at t={t}: sigma_t^2 exceeds 1 - alpha_bar_prev (eq. 16); use eta <= 1."
            )

        # eq. 12: x_{t-1} = sqrt(alpha_bar_prev) x0 + "direction pointing to x_t" + sigma_t noise
        dir_xt = max(dir_scale_sq, 0.0) ** 0.5 * eps
        x_prev = alpha_bar_prev**0.5 * x0 + dir_xt
        if eta > 0:
            x_prev = x_prev + sigma_t * self._variance_noise(model_output, generator, variance_noise)

        if not return_dict:
            return x_prev, x0
        return SchedulerOutput(prev_sample=x_prev, pred_original_sample=x0)


class DDIMInverseScheduler(Scheduler):
    """DDIM run backwards (eta = 0): x_t -> x_{t_next}, from an image towards noise.

    The timesteps ascend: leading 0, r, 2r, ... (+ steps_offset), trailing r-1, 2r-1, ..., T-1
    (r = T // n or T / n): the exact reverse of DDIMScheduler's grid with the same options, so a
    DDIM run with the same n walks back along the same noise levels.

    `step(model_output, t_next, x)` takes the timestep to move TO; the sample is taken to sit at
    t = t_next - T // n, or at the start (alpha_bar = 1 if `set_alpha_to_one`, else alpha_bar_0) when
    that is below 0. Callers evaluate the model as model(x, t_next): eps at the noisier level
    for a sample that is not there yet. That is the approximation of DDIM inversion (below).

    Why inversion is exact only in the ODE limit: the DDIM step x_{t_next} -> x_t uses
    eps(x_{t_next}), but going the other way we only have x_t, so the inverse step uses
    eps(x_t) instead. The difference is O(step size) per step in eps, O(step size^2) in x, and
    sums to an O(1/n) error over n steps (DDIM sec. 4.3: eq. 14 is an Euler step of the
    ODE, whose reverse is another Euler step). The error vanishes as n grows, or when eps does
    not change along the path (e.g. a model that predicts the same noise for x_t and x_{t_next}).
    """

    timestep_spacings = ("leading", "trailing")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        set_alpha_to_zero: bool | None = None,
    ):
        if set_alpha_to_zero is not None:
            # Old diffusers name of the same switch (its value is used as set_alpha_to_one).
            warnings.warn("set_alpha_to_zero is deprecated; use set_alpha_to_one.", FutureWarning, stacklevel=2)
            set_alpha_to_one = set_alpha_to_zero
        options = dict(locals())
        del options["set_alpha_to_zero"]
        self._setup(options)
        # Before the first step the sample is the clean image: alpha_bar = 1, or alpha_bar_0.
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(num_train_timesteps)  # until set_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the n timesteps (ascending): DDIMScheduler's grid, reversed."""
        self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(self._spaced_timesteps(self.num_inference_steps)[::-1].copy()).to(device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One inverted DDIM step x_t -> x_{t_next}, t_next = `timestep` (eq. 12 with sigma_t = 0,
        solved from the other end). `prev_sample` is the noisier sample."""
        self._check_ready()
        T = self.config.num_train_timesteps
        x_t = sample
        t_next = int(timestep)
        t = min(t_next - T // self.num_inference_steps, T - 1)  # where the sample is now
        alpha_bar_t = self._alpha_bar(t) if t >= 0 else float(self.initial_alpha_cumprod)
        alpha_bar_next = self._alpha_bar(t_next)

        x0, eps = self.predict_x0_and_eps(model_output, x_t, alpha_bar_t)
        x0 = self._clip_or_threshold(x0)
        # eq. 12 with sigma_t = 0, from t to t_next: the same x0 and eps, at the noisier level
        x_next = alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * eps

        if not return_dict:
            return x_next, x0
        return SchedulerOutput(prev_sample=x_next, pred_original_sample=x0)
