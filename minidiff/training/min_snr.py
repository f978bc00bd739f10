"""Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"), for the three things a diffusion model may predict.

The forward process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps has, at step t, the
signal-to-noise ratio

    SNR_t = abar_t / (1 - abar_t)                 (large near t = 0, tiny near t = T)

Written as a loss on x_0, every prediction type is an x_0 loss with its own weight:

    predict x_0 ("sample")        || x0_hat - x0 ||^2                     weight 1
    predict eps ("epsilon")       || eps_hat - eps ||^2  = SNR_t     || x0_hat - x0 ||^2
    predict v ("v_prediction")    || v_hat - v ||^2      = (SNR_t+1) || x0_hat - x0 ||^2

Min-SNR-gamma wants the x_0-loss weight min(SNR_t, gamma): the easy, nearly noise-free steps stop
dominating the gradient (the paper, eq. 9 and table 1). The weight on the loss the model actually
computes is therefore

    sample          w_t = min(SNR_t, gamma)
    epsilon         w_t = min(SNR_t, gamma) / SNR_t
    v_prediction    w_t = min(SNR_t, gamma) / (SNR_t + 1)

which is exactly what diffusers' training scripts compute (`compute_snr`, then the stack / min /
divide of train_text_to_image_prior.py). For the Kandinsky prior (sample prediction, gamma 5,
squaredcos_cap_v2 over 1000 steps) this means: SNR_t is 0.024 at t = 900 and below 1e-2 from
t = 936 on (2.4e-9 at t = 999), so the steps where sampling starts get almost no weight, while
every step t < 261 (SNR_t >= 5) gets the full weight 5.
"""

from __future__ import annotations

import torch

from minidiff.errors import InputError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t) for each timestep, float32, on the timesteps' device."""
    abar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return abar / (1 - abar)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights (B,) for `timesteps` (B,); gamma None gives ones (plain MSE)."""
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction_type must be one of {list(PREDICTION_TYPES)}; got {prediction_type!r}.")
    if gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    s = snr(alphas_cumprod, timesteps)
    w = s.clamp(max=gamma)  # min(SNR_t, gamma): the x_0-loss weight
    if prediction_type == "epsilon":
        return w / s
    if prediction_type == "v_prediction":
        return w / (s + 1)
    return w
