"""Noise schedules: the betas beta_1..beta_T of the forward process and the curves derived from them.

The forward process (Ho et al. 2020, eq. 2 and 4) adds a little Gaussian noise at each of the T
training steps:

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_{s<=t} (1 - beta_s)

so a schedule is fully described by alpha_bar_t, or by the signal-to-noise ratio
SNR(t) = alpha_bar_t / (1 - alpha_bar_t). This file builds the betas the checkpoints were trained
with:

    linear             beta_start .. beta_end, evenly spaced            (Ho et al. 2020, sec. 4)
    scaled_linear      sqrt(beta) evenly spaced, then squared: the Stable Diffusion / LDM schedule
                       (beta_start=0.00085, beta_end=0.012)
    squaredcos_cap_v2  alpha_bar_t = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008, each beta
                       capped at 0.999                                 (Nichol & Dhariwal 2021, eq. 17)
    trained_betas      an explicit list from the config
    rescale_zero_terminal_snr   shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0, i.e. the last
                       training step is pure noise                     (Lin et al. 2023, Algorithm 1)

The betas are float32, built with the same float32 operations diffusers uses, so that both
libraries hold bit-identical alpha_bar tables (a 1-ulp difference would already be a relative
error of ~1e-7, far above the 1e-10 at which the parity tests compare the samplers).

References:
    Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
    Lin, Liu, Li & Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from minidiff.errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(
    num_train_timesteps: int,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | torch.Tensor | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The float32 betas, shape (num_train_timesteps,). `trained_betas` wins over the schedule."""
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float32).flatten().clone()
        if len(betas) != num_train_timesteps:
            raise InputError(
                f"trained_betas has {len(betas)} entries but num_train_timesteps is "
                f"{num_train_timesteps}; give one beta per training step."
            )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the LDM / Stable Diffusion schedule.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(num_train_timesteps)
    else:
        raise InputError(
            f"Unknown beta_schedule {beta_schedule!r}. minidiff supports {list(BETA_SCHEDULES)}, "
            "or an explicit list of trained_betas."
        )
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1) for the cosine
    alpha_bar, computed in float64 and capped at `max_beta` (their sec. 3.2: "to prevent
    singularities at the end of the diffusion process near t = T")."""

    def alpha_bar(u: float) -> float:  # u = t / T in [0, 1]; s = 0.008 keeps beta_1 from being tiny
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta) for t in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: make the last step pure noise (SNR(T) = 0).

    Common schedules leave a little signal at t = T (SD: alpha_bar_T ~ 0.0047), but sampling
    starts from pure noise, so the model never learns what to do there and images keep a
    medium average brightness. The fix works on sqrt(alpha_bar): shift it so the last value is
    0, and scale it so the first value is unchanged; then read the betas back off.
    """
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))  # now [first, ..., 0]
    alpha_bar = sqrt_alpha_bar**2
    # Undo the cumulative product: alpha_t = alpha_bar_t / alpha_bar_{t-1}, alpha_1 = alpha_bar_1.
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas  # beta_T is exactly 1


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log SNR(t) = log(alpha_bar_t / (1 - alpha_bar_t)), computed in float64 (-inf where
    alpha_bar_t = 0, i.e. at the last step of a zero-terminal-SNR schedule)."""
    alpha_bar = alphas_cumprod.double()
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)
