"""pix2pix-zero's regulariser of the inverted noise, an option of DiffEdit's `invert`.

Parmar et al. 2023, "Zero-shot Image-to-Image Translation" (pix2pix-zero), sec. 3.1. DDIM
inversion predicts a noise eps at every step; noise the model was trained on is i.i.d. N(0, I),
so a few gradient steps on the model output push the eps it implies towards that:

    L_auto = sum over images, channels, pyramid levels of  corr(eps, roll(eps, r))^2   (along H and W)
    L_KL   = 2 KL(N(mu, s^2) || N(0, 1)) of all entries of eps
    out   <- out - lambda_auto_corr * grad L_auto(eps(out)) / rolls    (once per roll: new shifts r)
    out   <- out - lambda_kl * grad L_KL(eps(out))

Not part of DiffEdit (Couairon et al. 2022); diffusers' DiffEdit pipeline offers it, off by
default (num_reg_steps=0), and so does minidiff.

Where diffusers (0.42) differs: it converts a v-prediction (or x_0 prediction) to eps with the
CFG-doubled latents, which is wrong, or a shape error, under guidance; here the undoubled x_t is
used (tests/test_diffedit.py compares the two without guidance, where both are right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minidiff.schedulers.base import Scheduler


def auto_corr_loss(eps: torch.Tensor, generator=None) -> torch.Tensor:
    """Sum over images, channels and pyramid levels of the squared auto-correlation of eps at a
    random shift r in [0, side / 2), along H and along W. White noise has none. eps (B, C, h, w).
    One generator, or one per image. (r can be 0, as in diffusers: then the term is mean(eps^2)^2.)"""
    loss = eps.new_zeros(())
    for b in range(eps.shape[0]):
        g = generator[b] if isinstance(generator, list) else generator
        for c in range(eps.shape[1]):
            e = eps[b:b + 1, c:c + 1]  # (1, 1, h, w)
            while True:  # coarser and coarser levels until the side is <= 8
                r = int(torch.randint(e.shape[2] // 2, (1,), generator=g,
                                      device=g.device if g is not None else "cpu"))
                loss = loss + (e * torch.roll(e, shifts=r, dims=2)).mean() ** 2
                loss = loss + (e * torch.roll(e, shifts=r, dims=3)).mean() ** 2
                if e.shape[2] <= 8:
                    break
                e = F.avg_pool2d(e, kernel_size=2)  # (1, 1, h/2, w/2)
    return loss


def kl_divergence(eps: torch.Tensor) -> torch.Tensor:
    """2 KL(N(mu, s^2) || N(0, 1)) = s^2 + mu^2 - 1 - log s^2, with mu, s^2 the mean and
    (unbiased) variance of all entries of eps."""
    return eps.var() + eps.mean() ** 2 - 1 - torch.log(eps.var() + 1e-7)


def regularise(model_output: torch.Tensor, x_t: torch.Tensor, t, scheduler: Scheduler, generator=None,
               lambda_auto_corr: float = 20.0, lambda_kl: float = 20.0, num_reg_steps: int = 1,
               num_auto_corr_rolls: int = 5) -> torch.Tensor:
    """`num_reg_steps` rounds of gradient steps on the model output (B, C, h, w) that lower the
    auto-correlation and KL losses of the eps it implies at (x_t, t). The model output may be any
    of the scheduler's parameterisations: the losses see eps through `predict_x0_and_eps`, and
    autograd carries their gradients back through that conversion."""
    alpha_bar_t = float(scheduler.alphas_cumprod[int(t)])

    def grad_of(loss_fn, out: torch.Tensor) -> torch.Tensor:
        out = out.detach().clone().requires_grad_(True)
        _, eps = scheduler.predict_x0_and_eps(out, x_t, alpha_bar_t)
        (grad,) = torch.autograd.grad(loss_fn(eps), out)
        return grad

    with torch.enable_grad():
        for _ in range(num_reg_steps):
            if lambda_auto_corr > 0:
                for _ in range(num_auto_corr_rolls):  # each roll draws new random shifts
                    grad = grad_of(lambda eps: auto_corr_loss(eps, generator), model_output)
                    model_output = model_output - lambda_auto_corr * (grad / num_auto_corr_rolls)
            if lambda_kl > 0:
                model_output = model_output - lambda_kl * grad_of(kl_divergence, model_output)
    return model_output.detach()
