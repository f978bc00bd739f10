"""Train the shapes-world MoVQ: a VQModel with spatially normalised decoder, f=8 (128x128x3 <-> 16x16x4).

Loss (VQ-VAE, van den Oord et al. 2017, eq. 3; MoVQ, Zheng et al. 2022): L1 reconstruction of the
decoded *quantised* latent + the quantiser's codebook and commitment terms (VectorQuantizer's loss;
the straight-through estimator carries the reconstruction gradient to the encoder). No GAN or
perceptual term: the shapes world has flat colours and sharp edges, which L1 alone reconstructs.

Two things a from-scratch VQ needs that a pretrained one does not:
  - codebook initialisation from data: the taming initialisation U(-1/K, 1/K) puts every code
    near 0, where the first encoder outputs pick one or two of them and the rest never train.
    The codebook starts as K random encoder outputs of the first batch instead;
  - dead-code restarts: every `restart_every` steps, codes no latent pixel chose since the last
    restart are moved onto random current encoder outputs (the "codebook reset" of Williams et
    al. 2020 / Dhariwal et al. 2020's Jukebox), so the whole codebook stays in use.

Afterwards the latent is rescaled to unit variance, exactly (`rescale_latents`): the Kandinsky
decoder pipeline has no scaling factor (it decodes what the diffusion model makes), so the scale
must be in the MoVQ itself for the UNet's noise schedule to fit it.

The run's skeleton (resume, checkpoints, time budget, devices) is loop.py's `TrainingRun`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from minidiff.models.vq import VQModel, VQModelConfig
from minidiff.training.shapes.configs import DEFAULT_CKPT_DIR, MOVQ_CONFIG
from minidiff.training.shapes.data import scene_batches
from minidiff.training.shapes.loop import TrainingRun, training_device
from minidiff.training.shapes.train_vae import random_crops


@torch.no_grad()
def rescale_latents(movq: VQModel, s: float) -> None:
    """Multiply the latent (what encode returns, the codebook, what decode takes) by s without
    changing any reconstruction: quant_conv's output and the codebook scale by s; post_quant_conv
    and every SpatialNorm's conv_y / conv_b read it, so their weights scale by 1 / s. The nearest
    code of s*z is s times the nearest code of z, so quantisation picks the same codes."""
    movq.quant_conv.weight.mul_(s)
    movq.quant_conv.bias.mul_(s)
    movq.quantize.embedding.weight.mul_(s)
    movq.post_quant_conv.weight.div_(s)
    for name, module in movq.decoder.named_modules():
        if name.endswith("conv_y") or name.endswith("conv_b"):
            module.weight.div_(s)


@torch.no_grad()
def measure_latent_std(movq: VQModel, n: int = 512, seed: int = 12345, batch_size: int = 64) -> float:
    device = next(movq.parameters()).device
    batches = scene_batches(seed, batch_size)
    zs = [movq.encode(next(batches).images.to(device)).latents for _ in range(-(-n // batch_size))]
    return torch.cat(zs).std().item()


def train_movq(out_dir=DEFAULT_CKPT_DIR, steps: int = 3000, batch_size: int = 16, seed: int = 0, lr: float = 1e-3,
               warmup: int = 100, ckpt_every: int = 200, restart_every: int = 100, resume: bool = False,
               config: dict | None = None, max_minutes: float | None = None, crop: int | None = 64,
               device="cpu", progress: bool = True) -> VQModel:
    """Train the f=8 MoVQ; saves `<out_dir>/movq/` (diffusers layout), latents rescaled to unit
    variance, and returns it on the CPU."""
    out_dir, device = Path(out_dir), training_device(device)
    torch.manual_seed(seed)
    movq = VQModel(VQModelConfig(**(config or MOVQ_CONFIG))).to(device)
    opt = torch.optim.AdamW(movq.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)  # crops and code restarts
    run = TrainingRun("movq", out_dir, {"model": movq}, opt, g, steps, lr, warmup, ckpt_every,
                      resume=resume, max_minutes=max_minutes, progress=progress)
    K = movq.config.num_vq_embeddings
    used = torch.zeros(K, dtype=torch.bool)

    batches = scene_batches(seed + 5, batch_size, start=run.start * batch_size)
    movq.train()
    for step in run:
        x = next(batches).images  # (B, 3, 128, 128) in [-1, 1]
        if crop is not None and crop < x.shape[-1]:
            x = random_crops(x, crop, g)
        x = x.to(device)
        z_e = movq.encode(x).latents  # (B, 4, crop/8, crop/8)
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]).cpu()  # (N, 4)
        if step == 0 and not resume:
            with torch.no_grad():  # codebook <- K random encoder outputs (with replacement if N < K)
                pick = torch.randint(0, len(flat), (K,), generator=g)
                movq.quantize.embedding.weight.copy_(flat[pick].to(device))
        z_q, vq_loss, (_, _, indices) = movq.quantize(z_e)
        used[indices.cpu()] = True
        x_hat = movq.decoder(movq.post_quant_conv(z_q), z_q)  # as decode(z_e) does, but keeping vq_loss
        rec = F.l1_loss(x_hat, x)
        run.optimize(step, rec + vq_loss, max_grad_norm=1.0)
        if (step + 1) % restart_every == 0:
            dead = (~used).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    pick = torch.randint(0, len(flat), (len(dead),), generator=g)
                    movq.quantize.embedding.weight[dead.to(device)] = flat[pick].to(device)
            used.zero_()
        if run.end_step(step, rec.item(), l1=f"{rec.item():.4f}", vq=f"{vq_loss.item():.4f}"):
            break
    run.finish()

    movq.eval()
    std = measure_latent_std(movq)
    rescale_latents(movq, 1.0 / std)
    movq.cpu().save_pretrained(out_dir / "movq")
    print(f"[movq] latent std {std:.4f}, rescaled to 1")
    return movq
