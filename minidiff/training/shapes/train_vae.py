"""Train the shapes-world autoencoder: AutoencoderKL, f=8 (128x128x3 <-> 16x16x4).

Loss: L1 reconstruction + a tiny KL term (LDM paper, Rombach et al. 2022, section 3 and
appendix G: "KL-reg" with weight ~1e-6), AdamW with linear warmup and a cosine decay.
Afterwards scaling_factor = 1 / std(latents), measured on training scenes (SD's 0.18215 is the
same rule applied to its VAE: LDM section 4.3.2), so the UNet sees latents of about unit variance.

The run's skeleton (resume, checkpoints, time budget, devices) is loop.py's `TrainingRun`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from minidiff.models.vae import AutoencoderKL, AutoencoderKLConfig
from minidiff.training.shapes.configs import DEFAULT_CKPT_DIR, VAE_CONFIG
from minidiff.training.shapes.data import scene_batches
from minidiff.training.shapes.loop import TrainingRun, training_device


def random_crops(images: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random size x size window per image (B, C, H, W) -> (B, C, size, size)."""
    B, _, H, W = images.shape
    ys = torch.randint(0, H - size + 1, (B,), generator=g).tolist()
    xs = torch.randint(0, W - size + 1, (B,), generator=g).tolist()
    return torch.stack([im[:, y:y + size, x:x + size] for im, y, x in zip(images, ys, xs)])


@torch.no_grad()
def measure_latent_std(vae: AutoencoderKL, n: int = 512, seed: int = 12345, batch_size: int = 64) -> float:
    """Std of posterior samples z over n training scenes (SD's 0.18215 = 1 / this for its VAE),
    computed where the VAE is (the noise is drawn on the CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    batch_size = min(batch_size, n)
    batches = scene_batches(seed, batch_size)
    zs = [vae.encode(next(batches).images.to(device)).latent_dist.sample(g)
          for _ in range(math.ceil(n / batch_size))]  # (B, 4, 16, 16) each
    return torch.cat(zs).std().item()


def train_vae(out_dir=DEFAULT_CKPT_DIR, steps: int = 4000, batch_size: int = 16, seed: int = 0,
              lr: float = 1e-3, kl_weight: float = 1e-6, warmup: int = 100, ckpt_every: int = 200,
              resume: bool = False, config: dict | None = None, max_minutes: float | None = None,
              std_scenes: int = 512, crop: int | None = 64, device="cpu", progress: bool = True) -> AutoencoderKL:
    """Train the f=8 autoencoder; saves `<out_dir>/vae/` (diffusers layout) with a measured scaling_factor
    and returns it on the CPU. `device`: where it trains (loop.py, "Devices"); the weights start
    from the same CPU initialisation and the crops and noise come from the same CPU generator.

    The autoencoder is fully convolutional, so it trains on random `crop` x `crop` windows of the
    128 x 128 scenes (a quarter of the pixels per image: about 4x cheaper per step) and is used on
    whole images afterwards. The mid-block attention then sees 8 x 8 instead of 16 x 16 latents;
    the held-out PSNR on whole images is what `evaluate.evaluate_vae` reports."""
    out_dir, device = Path(out_dir), training_device(device)
    torch.manual_seed(seed)
    vae = AutoencoderKL(AutoencoderKLConfig(**(config or VAE_CONFIG))).to(device)  # initialised on the CPU
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)  # the crops and the posterior noise
    run = TrainingRun("vae", out_dir, {"model": vae}, opt, g, steps, lr, warmup, ckpt_every,
                      resume=resume, max_minutes=max_minutes, progress=progress)

    batches = scene_batches(seed, batch_size, start=run.start * batch_size)
    vae.train()
    for step in run:
        x = next(batches).images  # (B, 3, 128, 128) in [-1, 1]
        if crop is not None and crop < x.shape[-1]:
            x = random_crops(x, crop, g)  # (B, 3, crop, crop)
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(g)  # (B, 4, crop / 8, crop / 8)
        x_hat = vae.decode(z).sample
        rec = F.l1_loss(x_hat, x)
        kl = posterior.kl().mean()  # per image, summed over the latent
        run.optimize(step, rec + kl_weight * kl, max_grad_norm=1.0)
        if run.end_step(step, rec.item(), l1=f"{rec.item():.4f}", kl=f"{kl.item():.0f}"):
            break
    run.finish()

    vae.eval()
    std = measure_latent_std(vae, n=std_scenes)
    vae.config.scaling_factor = 1.0 / std
    vae.cpu().save_pretrained(out_dir / "vae")
    print(f"[vae] latent std {std:.4f} -> scaling_factor {vae.config.scaling_factor:.5f}")
    return vae
